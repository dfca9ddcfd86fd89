"""Serving: the Ray Serve application, its wire protocol, batching, admission, routing, failover,
and offline batch inference with the same engines.

Where things go:
- protocol.py    the /v1 wire protocol: schemas, request decoding, error bodies (pure, no Ray)
- oip.py         the Open Inference Protocol (KServe v2, /v2) with binary tensor data (pure)
- settings.py    deploy-time settings derived from the config: Serve environment, deployment
                 options, derived limits (pure; the app, serve_config and tandem/k8s.py use it)
- app.py         the HTTP replica (TandemServer: /v1 and /v2 routes) and `build_app`, the import
                 path Serve config files and RayServices name (`serving.app:build_app`)
- asgi.py        responses in each protocol's body, and HotPath: the two prediction routes past
                 FastAPI's routing (the declared routes stay for everything else and OpenAPI)
- model_replica.py  an engine behind its batcher (LocalModel), and the model deployment behind
                 the router ingress (ModelReplica)
- deploy.py      deploying from Python on the driver: serve, shutdown, status, URLs
- serve_config.py the Ray Serve config file for `serve deploy` and the RayService
- batching.py    the adaptive batcher (policy, pure); admission.py the gate on arrival;
  router.py      choosing a deployment; failover.py resending what a lost replica dropped;
  coalesce.py    the router's concurrent requests for one deployment sent as one handle call
- haproxy_front.py  `tandem-haproxy`: Ray's HAProxy configuration plus Tandem's shedding in front
- engines.py     inference engines (torch, ONNX Runtime) behind one Protocol; a new engine goes here
- cache.py, metrics.py  result cache, Prometheus metrics
- client.py      a small client; loadgen.py the one closed-loop load generator (LoadResult)
- offline.py     `tandem predict`: offline batch inference on Ray Data actor pools, one per deployment
- optimize/      export and optimization of artifacts (ONNX, int8, pruning, parity reports)

May import: `cluster` (the foundation) only; `serving.optimize` may also import `training`.
Rendering a Serve config (serve_config, settings) needs neither Ray Serve nor FastAPI.
"""
