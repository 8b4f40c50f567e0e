"""Every private Lightning/torch name the package relies on still exists in the installed versions."""

from __future__ import annotations

from lightning_utils._internals import PRIVATE_NAMES, PrivateName, _resolve, missing_private_names


def test_every_listed_private_name_exists_in_the_installed_lightning_and_torch() -> None:
    missing = missing_private_names()
    assert not missing, (
        "private names gone from the installed Lightning/torch; update lightning_utils._internals:\n"
        + "\n".join(f"  {m.module}.{m.attribute} (used by {m.used_by}: {m.why})" for m in missing)
    )


def test_every_entry_says_why_and_which_public_alternative_was_checked() -> None:
    for entry in PRIVATE_NAMES:
        assert entry.used_by and entry.why and entry.public, entry


def test_the_check_notices_a_vanished_name() -> None:
    assert not _resolve(PrivateName("torch", "_no_such_private_name", "test", "test", "test"))
    assert not _resolve(PrivateName("lightning.pytorch.loops.fit_loop", "_FitLoop.<instance>._nope", "t", "t", "t"))
    assert _resolve(
        PrivateName(
            "lightning.pytorch.loops.fit_loop", "_FitLoop.<instance>._combined_loader_states_to_load", "t", "t", "t"
        )
    )
