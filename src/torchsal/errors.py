"""User-facing errors. The CLI prints any of them as one line (no traceback unless --debug) and exits 2."""


class TorchsalError(Exception):
    """Base of every error that names a user's mistake and its fix."""


class ConfigError(TorchsalError, ValueError):
    """An option, or a combination of options, that cannot work."""


class DataError(TorchsalError, ValueError):
    """A dataset that is missing, malformed or unusable."""


class DivergenceError(TorchsalError, RuntimeError):
    """Training produced NaN or Inf."""


class DistributedError(TorchsalError, RuntimeError):
    """A peer process of a distributed run stopped or could not be reached."""


class RunInterrupted(TorchsalError):
    """SIGINT or SIGTERM stopped a run after a finished step; its checkpoint was written to ``checkpoint``."""

    def __init__(self, checkpoint: str, step: int) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint written to {checkpoint}")
        self.checkpoint, self.step = checkpoint, step
