"""The one error type every converter raises, and its advice reworded for other commands."""
import re

__all__ = ["ConversionError", "advice_for"]


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message says what was expected, what was
    found, and how to fix it."""


_ARCH_OPTION = re.compile(r"--arch(?: (?=[A-Za-z])([\w.]+))?")


def advice_for(error: ConversionError, setting: str = "model") -> str:
    """``error``'s message for a command that names the backbone with ``setting=`` (pretrain's and
    finetune's ``model=``) instead of the convert command's ``--arch``: ``--arch resnet18`` becomes
    ``model=resnet18``."""
    return _ARCH_OPTION.sub(lambda m: f"{setting}={m.group(1) or 'NAME'}", str(error))
