# The image KubeRay pods run (cluster.image): Ray 2.60 with Tandem and its pinned stack.
#
#   docker build -t REGISTRY/tandem:0.1.0 .                      # CPU
#   docker build -t REGISTRY/tandem:0.1.0-gpu \
#     --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker push ...; then set cluster.image in the config and run `tandem k8s`.
#
# Keep .venv, .cache and runs out of the build context (a .dockerignore listing them): the
# virtual environment alone is about 1.8 GB.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311
FROM ${BASE_IMAGE}

# torch first and from its own index: a bare `pip install torch` on Linux pulls the multi-GB
# CUDA build, which a CPU image does not need (the GPU build above passes a CUDA index).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/tandem
COPY --chown=ray:users constraints.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "$(grep '^torch==' constraints.txt)"

# The rest of the stack, pinned; the base image's ray==2.60.0 already satisfies the pin, so the
# Ray in the image is the one the KubeRay manifests name in rayVersion.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users training ./training
COPY --chown=ray:users tuning ./tuning
COPY --chown=ray:users serving ./serving
COPY --chown=ray:users profiling ./profiling
COPY --chown=ray:users tandem ./tandem
COPY --chown=ray:users examples ./examples
# The rendered manifests point Ray's HAProxy at tandem-haproxy by this path
# (serving.settings.IMAGE_FRONT_BINARY): the build fails if pip put it elsewhere.
RUN pip install --no-cache-dir -c constraints.txt ".[tracking]" \
    && python -c "import ray, tandem.cli; assert ray.__version__ == '2.60.0', ray.__version__" \
    && test -x /home/ray/anaconda3/bin/tandem-haproxy

# Serve replicas and Ray Train workers import the installed packages; the working directory
# only holds the examples a user may point `tandem` at.
WORKDIR /home/ray
