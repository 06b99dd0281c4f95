"""Adds ``PeftType.LSR`` to peft's enum; peft only registers methods it knows by name.

peft 0.21 refuses ``register_peft_method`` for a name outside ``PeftType``
(docs/design.md §5), and ``PeftModel.from_pretrained`` resolves configs through it,
so the member has to exist as soon as ``lsr_compile`` is imported.

This is where ``import lsr_compile`` first imports peft, and peft imports torchao and bitsandbytes whenever they
are installed (the ``quant`` extra). Their imports log warnings about kernels built for hardware this machine
lacks ("Failed to load …_C_mxfp8…", "Failed to load CPU gemm_4bit_forward from kernels-community", torch's
pytree deprecation notes for torchao's enums): noise for a user of LSR on a dense base, so those loggers are
quiet below ERROR while peft is first imported, and only then.
"""
import contextlib
import logging

# the loggers peft's optional imports write to (torchao 0.18, bitsandbytes 0.50, torch 2.13)
_NOISY = ("torchao", "bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_optional_backends():
    quiet, loggers = _BelowError(), [logging.getLogger(name) for name in _NOISY]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


with _quiet_optional_backends():
    from peft.utils.peft_types import PeftType
    import peft  # noqa: F401  (its optional backends, imported here while they are quiet)


def _extend_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


LSR_PEFT_TYPE = _extend_peft_type("LSR")
