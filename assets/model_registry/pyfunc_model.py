"""The pyfunc wrapper our models are registered as, logged as MLflow "models from code".

Why a wrapper: MLflow 3's default PyTorch format (pt2/torch.export) keeps `forward` only, so
`embed()` and every other custom method would be lost. We register the model's own artifact file
(the one `model_lib` writes) and a loader given by import path ("package.module:function"); the
loaded object keeps every method, and `predict()` calls one of them by name.

Why "models from code" rather than a pickled `PythonModel`: MLflow 3.17 refuses to unpickle a
cloudpickled model unless `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true`, and a pickled class would
also need this package importable under the same name wherever the model is loaded. MLflow
copies this very file into the model and executes it on load; the configuration lives in the
model's `model_config` (visible in its MLmodel file) and the loader's package travels as
`code_paths`. So this module must import nothing from the project: only the standard library,
numpy, pandas and mlflow (torch lazily). Like any pickle, loading a model runs code shipped
with it: load only models from our own registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

#: Name of the model artifact in the logged model (`context.artifacts[MODEL_ARTIFACT_KEY]`).
MODEL_ARTIFACT_KEY = "model_file"

#: How `predict()` hands a pandas frame to the configured method.
INPUT_FORMATS = ("frame", "numpy", "tensor")


def resolve_import_path(path: str) -> Any:
    """Import "package.module:attribute" (or "package.module.attribute") and return the attribute."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"expected an import path like 'package.module:function', got {path!r}")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def outputs_to_frame(outputs: Any, output_prefix: str, index: pd.Index | None = None) -> pd.DataFrame:
    """Turn a method's output into a DataFrame MLflow can serve.

    A mapping (e.g. one probability vector per task) gives one column per key (2-D values give
    `key_0..key_k`); an array or tensor gives `<prefix>_0..<prefix>_k` (a 1-D one, `<prefix>`).
    """
    if isinstance(outputs, pd.DataFrame):
        return outputs
    columns: dict[str, np.ndarray] = {}
    items = outputs.items() if isinstance(outputs, Mapping) else [(output_prefix, outputs)]
    for key, value in items:
        array = _to_numpy(value)
        if array.ndim <= 1:
            columns[str(key)] = array.reshape(-1)
        elif array.ndim == 2:
            for j in range(array.shape[1]):
                columns[f"{key}_{j}"] = array[:, j]
        else:
            raise ValueError(f"output {key!r} has shape {array.shape}: expected 1-D or 2-D")
    frame = pd.DataFrame(columns)
    if index is not None and len(frame) == len(index):
        frame.index = index
    return frame


class ArtifactModel(mlflow.pyfunc.PythonModel):
    """Holds a model loaded from its own artifact file; `predict` calls a configured method.

    model_config keys (all written at log time, see `MLflowTracking.log_model_artifact`):
      loader          "package.module:function", called with the artifact's local path
      predict_method  name of the loaded object's method that `predict` calls (e.g. "embed")
      input_format    "frame" (the DataFrame as is), "numpy" (float32 array) or "tensor"
                      (float32 torch tensor); ignored when input_adapter is set
      input_adapter   optional "package.module:function"(model, frame) -> argument, for models
                      whose method needs more than a numeric matrix (e.g. encoded sequences)
      output_prefix   column prefix of array outputs (default: predict_method)

    After `mlflow.pyfunc.load_model(uri).unwrap_python_model()`, `.model` is the loaded object,
    and its attributes are reachable on the wrapper itself (`wrapper.embed(x)`).
    """

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        missing = {"loader", "predict_method"} - set(config)
        if missing:
            raise ValueError(f"model_config lacks {sorted(missing)}: got {sorted(config)}")
        self.config = config
        loader = resolve_import_path(config["loader"])
        self.model = loader(context.artifacts[MODEL_ARTIFACT_KEY])
        if hasattr(self.model, "freeze"):  # fixed for serving (e.g. `UserModel.freeze`)
            self.model.freeze()
        elif hasattr(self.model, "eval"):  # torch modules: dropout off for inference
            self.model.eval()
        adapter = config.get("input_adapter")
        self._input_adapter = resolve_import_path(adapter) if adapter else None

    def __getattr__(self, name: str) -> Any:
        # Called only for attributes the wrapper lacks: delegate to the loaded model. Guarded so
        # that a wrapper whose context is not loaded yet fails with AttributeError, not recursion.
        model = self.__dict__.get("model")
        if model is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(model, name)

    def _method_input(self, model_input: Any) -> Any:
        if self._input_adapter is not None:
            return self._input_adapter(self.model, model_input)
        input_format = self.config.get("input_format", "frame")
        if input_format == "frame":
            return model_input
        array = np.asarray(model_input, dtype=np.float32)
        if input_format == "numpy":
            return array
        if input_format == "tensor":
            import torch

            return torch.from_numpy(np.ascontiguousarray(array))
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Call the configured method on the input; return its outputs as a DataFrame.

        `params` (declared in the signature, e.g. TRACE's `as_of`) go to the method as keyword
        arguments; empty ones are left out so the method's defaults apply. A `ValueError` from the
        model (bad input: a timestamp that does not parse, an unknown event name) becomes an
        `INVALID_PARAMETER_VALUE` MlflowException, which `mlflow models serve` answers with a 400
        and the model's own message, not a generic error.
        """
        method_name = self.config["predict_method"]
        method = getattr(self.model, method_name)
        kwargs = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        try:
            argument = self._method_input(model_input)
        except ValueError as error:
            raise MlflowException.invalid_parameter_value(str(error)) from error
        try:
            import torch

            no_grad = torch.no_grad()
        except ImportError:  # a non-torch model
            from contextlib import nullcontext

            no_grad = nullcontext()
        with no_grad:
            try:
                outputs = method(argument, **kwargs)
            except (ValueError, KeyError) as error:
                raise MlflowException.invalid_parameter_value(f"{type(error).__name__}: {error}") from error
        prefix = self.config.get("output_prefix") or method_name
        index = model_input.index if isinstance(model_input, pd.DataFrame) else None
        return outputs_to_frame(outputs, prefix, index)


# MLflow executes this file when it logs or loads a model from code, and takes the object given
# here. On a normal import this only sets a global that MLflow reads right after such an execution.
mlflow.models.set_model(ArtifactModel())
