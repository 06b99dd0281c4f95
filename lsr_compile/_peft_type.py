"""Adds ``PeftType.LSR`` to peft's enum; peft only registers methods it knows by name.

peft 0.21 refuses ``register_peft_method`` for a name outside ``PeftType``
(docs/design.md §5), and ``PeftModel.from_pretrained`` resolves configs through it,
so the member has to exist as soon as ``lsr_compile`` is imported.
"""
from peft.utils.peft_types import PeftType


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
