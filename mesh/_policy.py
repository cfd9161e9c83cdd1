"""Per-subject policy: the models every writer and every node agree on.

A policy is stored as one :class:`PolicyRecord` per subject and section (see
:mod:`mesh._policy_store`): the section's value plus who wrote it, why, its version
and whether an operator pinned it. Sections exist only once something enforces
them; today that is ``codec``.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

#: zstd levels a policy may ask for.
MIN_ZSTD_LEVEL: Final = 1
MAX_ZSTD_LEVEL: Final = 19
#: Bodies smaller than this are sent uncompressed unless a policy says otherwise.
DEFAULT_MIN_SIZE: Final = 256


class CodecPolicy(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="section",
    tag="codec",
):
    """How bodies published on a subject are compressed.

    ``algorithm`` "none" sends bodies as they are; "zstd" compresses those of at least
    ``min_size`` bytes at ``level``, with the trained dictionary ``dictionary`` when it
    is not 0 (an id in the dictionary store).
    """

    algorithm: Literal["none", "zstd"] = "none"
    level: int = 3
    dictionary: int = 0
    min_size: int = DEFAULT_MIN_SIZE


#: The union of every section's value; a new section is appended here.
Section = CodecPolicy
SECTIONS: Final = ("codec",)


class PolicyRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One section of one subject's policy, as stored and as nodes receive it.

    ``version`` starts at 1 and grows by one with every write of this subject and
    section; nodes refuse a version not above the one they hold. ``time`` is Unix ns.
    """

    subject: str
    version: int
    author: str
    reason: str
    time: int
    pinned: bool = False
    value: Section

    @property
    def section(self) -> str:
        return str(self.value.__struct_config__.tag)
