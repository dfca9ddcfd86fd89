"""What every config model shares: the strict base class and the constrained number types.

Imports nothing of Tandem.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated."""

    # ser_json_inf_nan: an infinite float (e.g. in model.args) stays a float in to_dict(), so
    # show-config prints `.inf`, not the `null` pydantic's JSON mode writes by default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="constants")


PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
