"""Exception families, one per subsystem, so callers can catch exactly what they expect."""


class EmberError(Exception):
    """Base class of every error ember raises on purpose."""


class ModelLoadError(EmberError):
    """A model spec could not be resolved, read or built."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint uses a family or feature the ember decoder does not implement."""


class GenerationError(EmberError):
    """Bad arguments to generation (prompts, sampling parameters, batch sizes)."""


class AdapterError(EmberError):
    """A LoRA adapter cannot be read, saved or applied (the message names the field or module)."""


class StepError(EmberError):
    """A forward step is inconsistent (layer range, inputs for where the range starts, logits mode)."""


class TaskError(EmberError):
    """A task generator or workload got parameters it cannot honour."""


class DatasetError(EmberError):
    """A benchmark set cannot be fetched, extracted or found."""


class ParamsError(EmberError):
    """A params file, profile or override does not validate."""


class ReportError(EmberError):
    """A run directory, manifest or generated file cannot be written or read."""


class KVWireError(EmberError):
    """A KV quantization request or a KVWire blob is invalid (the message names the field)."""


class PolicyError(EmberError):
    """A cache policy's parameters, or an update it cannot honour (the message says what was expected)."""


class TrainError(EmberError):
    """A trainer got examples, an adapter or a checkpoint it cannot use."""


class CommError(EmberError):
    """A cache-to-cache request is invalid: selection, allocation, pair, fuser or byte cap."""
