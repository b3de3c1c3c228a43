"""Which modalities a case to predict has: channel files that are absent and ``--drop-modalities``, read
against dataset.json's channel names. What a network does with an absent modality is the model's concern
(``entrust_nnunet.model.absence``); this module only decides, per case, which channels are present."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from entrust_nnunet.data.io import MAP_FOLDER, InputError

#: ``OUT/uncertainty/CASE`` + this: which modalities a case was predicted with
MODALITIES_SUFFIX = "_modalities.json"


def channel_list(channel_names: dict) -> list[str]:
    """dataset.json's ``channel_names`` ({"0": "T1", ...}) as a list indexed by channel."""
    return [str(channel_names[str(c)]) for c in range(len(channel_names))]


def parse_drop_modalities(value: str | None, channel_names: dict) -> list[int]:
    """The channels ``--drop-modalities T2,FLAIR`` names (dataset.json names, any case), sorted. One
    :class:`InputError` line naming the flag for an empty, unknown or every modality."""
    if value is None:
        return []
    names = channel_list(channel_names)
    lookup = {n.lower(): c for c, n in enumerate(names)}
    chosen = set()
    for item in (v.strip() for v in value.split(",")):
        if item.lower() not in lookup:
            raise InputError(f"--drop-modalities {value}: unknown modality {item!r} (the model's modalities: "
                             f"{', '.join(names)})")
        chosen.add(lookup[item.lower()])
    if len(chosen) == len(names):
        raise InputError(f"--drop-modalities {value}: drops every modality of the model ({', '.join(names)}); "
                         f"at least one must remain")
    return sorted(chosen)


@dataclass(frozen=True)
class CaseModalities:
    """Channels of one case: ``missing`` (no file) and ``dropped`` (``--drop-modalities``) are absent."""

    case: str
    names: tuple[str, ...]
    missing: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def present(self) -> list[bool]:
        return [c not in self.missing and c not in self.dropped for c in range(len(self.names))]

    @property
    def complete(self) -> bool:
        return all(self.present)

    def record(self) -> dict:
        """What ``OUT/uncertainty/CASE_modalities.json`` holds."""
        return {"case": self.case, "present": [n for n, p in zip(self.names, self.present) if p],
                "absent": [n for n, p in zip(self.names, self.present) if not p],
                "missing_file": [self.names[c] for c in self.missing],
                "dropped": [self.names[c] for c in self.dropped if c not in self.missing]}

    def warning(self, how: str = "masked") -> str:
        """One line: the case, its absent modalities, why, and ``how`` the network treats them."""
        why = [f"{', '.join(self.names[c] for c in self.missing)}: no file" if self.missing else "",
               f"{', '.join(self.names[c] for c in self.dropped if c not in self.missing)}: --drop-modalities"
               if set(self.dropped) - set(self.missing) else ""]
        return (f"entrust: warning: case {self.case}: predicting without {', '.join(self.record()['absent'])} "
                f"({'; '.join(w for w in why if w)}); absent modalities are {how}")


def case_modalities(cases: dict[str, list[str | None]], channel_names: dict, dropped: list[int],
                    drop_flag: str | None = None) -> dict[str, CaseModalities]:
    """Per case (files from ``collect_cases``, None = no file) which channels are present. A case left with
    none is one :class:`InputError` line naming the case (and the flag, when it dropped the rest)."""
    names = tuple(channel_list(channel_names))
    out = {}
    for case, files in cases.items():
        missing = tuple(c for c, f in enumerate(files) if f is None)
        info = CaseModalities(case, names, missing, tuple(dropped))
        if not any(info.present):
            where = f"--drop-modalities {drop_flag}: " if dropped else ""
            raise InputError(f"{where}case {case} has no modality left (no file for "
                             f"{', '.join(names[c] for c in missing) or 'none'}; dropped "
                             f"{', '.join(names[c] for c in dropped if c not in missing) or 'none'})")
        out[case] = info
    return out


def files_to_read(files: list[str | None], present: list[bool]) -> list[str]:
    """The files nnU-Net's preprocessing reads for one case: an absent channel reads the first present
    channel's file, as a placeholder of the right geometry (the network masks its values)."""
    placeholder = next(f for f, p in zip(files, present) if p)
    return [f if p else placeholder for f, p in zip(files, present)]


def modalities_path(pred_dir: str | Path, case: str) -> Path:
    return Path(pred_dir) / MAP_FOLDER / f"{case}{MODALITIES_SUFFIX}"
