"""Saving and loading models: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

Built on ``huggingface_hub.ModelHubMixin`` (``_save_pretrained`` / ``_from_pretrained``), not on
``PyTorchModelHubMixin``, which would save the frozen CLIP: a saved model is ``config.json``, the
prompts (``model.safetensors``, loaded strictly), the few-shot references when there are some
(``references.safetensors``) and a model card (``README.md``).

``config.json`` records which references file the profile has (``"references":
"references.safetensors"``, or ``null`` when zero-shot), so that a load never silently drops
references it cannot find: a Hub repo's files are fetched from one revision
(``snapshot_download``), and a file the config names but the folder, repo or offline cache
lacks is an error. Configs written before the record (anomalyclip < 0.3) load the references
when the file is there, as before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..backbone import load_clip
from ..card import MODEL_CARD_NAME, is_generated_card, write_model_card
from ..config import CONFIG_NAME, WEIGHTS_NAME, AnomalyCLIPConfig
from ..errors import CheckpointError, InvalidInputError, WeightsNotFoundError
from ..files import atomic_path, atomic_write, cache_root
from ..hub import hub_snapshot, is_offline, is_repo_id
from ..options import InferenceOptions
from ..presets import DEFAULT_PRESET, PRESETS, OfficialPreset, fetch_official_checkpoint, get_preset
from ..references import REFERENCES_NAME, ReferenceMemory
from ..runtime import place_model

__all__ = ["HubPersistence", "REFERENCES_KEY", "SAVED_FILES"]

logger = logging.getLogger(__name__)

#: The key of ``config.json`` that records the profile's references file (a name, or None).
REFERENCES_KEY = "references"
#: The files a saved model may have; a Hub load fetches these (from one revision) and nothing else.
SAVED_FILES = (CONFIG_NAME, WEIGHTS_NAME, REFERENCES_NAME, MODEL_CARD_NAME)
_UNRECORDED = object()  # a config.json written before the references record


class HubPersistence(ModelHubMixin):
    """The save/load/push half of :class:`~anomalyclip.AnomalyCLIP` (a mixin of the module)."""

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        name_or_path: str | os.PathLike | OfficialPreset | None = None,
        *,
        device: Any = None,
        dtype: Any = None,
        image_size: int | None = None,
        feature_layers: Any = None,
        dpam_layers: int | None = None,
        dpam_mode: str | None = None,
        sigma: float | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        quick_gelu: bool | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> Any:
        """Load a model, in eval mode: a preset name, a local directory, or a Hugging Face Hub repo id.

        Args:
            name_or_path: ``None`` (the default preset, the official prompts trained on VisA),
                a preset name (see :data:`anomalyclip.presets.PRESETS`), a directory written by
                :meth:`save_pretrained`, or a Hub repo id holding ``config.json`` and
                ``model.safetensors``.
            device: ``"cuda"``, ``"cpu"``, ``"mps"``...; None picks the best available.
            dtype: float32 (default), float16 or bfloat16 for the frozen CLIP; "auto" (per device: runtime.auto_dtype) or "float8" (CUDA, compute capability 8.9+: anomalyclip.float8).
            image_size, feature_layers, dpam_layers, dpam_mode, sigma: override the saved
                inference options (see :meth:`reconfigure`; None keeps the saved value).
            revision: Hub revision (branch, tag or commit) of a repo id.
            cache_dir: Hugging Face cache directory (also used for the backbone and presets).
            quick_gelu: override the backbone activation the saved config records (the one the
                prompts were trained with); a choice that disagrees with open_clip's pretrained
                registry is logged as a warning either way.
            token: Hub token for private or gated repos (None: the logged-in user's, if any;
                ``False``: none), as in ``huggingface_hub``.
            local_files_only: never download: use only the Hugging Face cache (a Hub repo id) or
                the preset cache; a missing file is a :class:`WeightsNotFoundError`.
            force_download: download the model's files again even when they are cached.

        ``token``, ``local_files_only`` and ``force_download`` apply to the prompts (Hub repo or
        preset). The CLIP backbone is fetched by open_clip, which follows the environment
        (``HF_TOKEN``, ``HF_HUB_OFFLINE=1``).

        Thresholds saved with the model (:meth:`calibrate`) are restored; an override that
        changes an inference option drops them with a warning (they were chosen for the saved
        options).
        """
        if name_or_path is None:
            name_or_path = DEFAULT_PRESET
        if not isinstance(local_files_only, bool) or not isinstance(force_download, bool):
            raise InvalidInputError(
                f"local_files_only and force_download must be True or False, got {local_files_only!r} and "
                f"{force_download!r}."
            )
        options = InferenceOptions(
            image_size=image_size, feature_layers=feature_layers, dpam_layers=dpam_layers, dpam_mode=dpam_mode, sigma=sigma
        )
        load = dict(device=device, dtype=dtype, options=options, quick_gelu=quick_gelu)
        fetch = dict(cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download)
        if isinstance(name_or_path, OfficialPreset):
            return cls._from_preset(name_or_path, **fetch, **load)
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise InvalidInputError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}.")
        name = os.fspath(name_or_path)
        if name in PRESETS:
            return cls._from_preset(name, **fetch, **load)
        return cls._from_pretrained(model_id=name, revision=revision, token=token, **fetch, **load)

    @classmethod
    def _from_pretrained(  # type: ignore[override]
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        **load: Any,
    ) -> Any:
        """A saved model from a local directory or a Hub repo id (``ModelHubMixin``'s hook)."""
        path = Path(model_id).expanduser()
        if path.is_dir():
            folder, where, hub = path, f"'{path}'", None
        elif is_repo_id(model_id) and not path.exists():
            folder = hub_snapshot(
                model_id,
                SAVED_FILES,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                force_download=force_download,
                what="saved model",
            )
            where = f"Hub repo '{model_id}'" + (f" at revision '{revision}'" if revision else "")
            hub = model_id
        else:
            raise InvalidInputError(
                f"'{model_id}' is not a directory, a preset ({', '.join(sorted(PRESETS))}) or a Hub repo id "
                "('org/name'). Check the path."
            )
        offline = hub is not None and (local_files_only or is_offline())
        files = {f: folder / f for f in (CONFIG_NAME, WEIGHTS_NAME)}
        for name, f in files.items():
            if not f.is_file():
                raise _missing_file(where, name, hub=hub, offline=offline)
        references_file = _references_file(folder, where, hub=hub, offline=offline)
        return cls._from_files(files, cache_dir=cache_dir, references_file=references_file, **load)

    @classmethod
    def _from_preset(
        cls,
        preset: str | OfficialPreset,
        *,
        device: Any,
        dtype: Any,
        options: InferenceOptions,
        quick_gelu: bool | None,
        cache_dir: str | os.PathLike | None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> Any:
        """A preset, converted from its verified official checkpoint on first use and cached."""
        preset = get_preset(preset)
        converted = cache_root(cache_dir) / "converted" / preset.name
        files = {f: converted / f for f in (CONFIG_NAME, WEIGHTS_NAME)}
        if force_download or not all(f.is_file() for f in files.values()):
            checkpoint = fetch_official_checkpoint(
                preset, cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download
            )
            official = cls.from_official_checkpoint(checkpoint, clip=preset.backbone, cache_dir=cache_dir, device="cpu")
            official.config = official.config.replace(trained_on=preset.trained_on)
            official.save_pretrained(converted, model_card=False)
        model = cls._from_files(
            files, device=device, dtype=dtype, options=options, quick_gelu=quick_gelu, cache_dir=cache_dir
        )
        if model.config.trained_on is None:  # converted by anomalyclip 0.1, before the field existed
            model.config = model.config.replace(trained_on=preset.trained_on)
        return model

    @classmethod
    def _from_files(
        cls,
        files: dict[str, Path],
        *,
        device: Any,
        dtype: Any,
        options: InferenceOptions,
        quick_gelu: bool | None,
        cache_dir: str | os.PathLike | None,
        references_file: Path | None = None,
    ) -> Any:
        """Build a model from the local files of a saved model (name -> path) and its references
        (a profile's thresholds stay: they were chosen with them), then apply ``options``. A
        ``quick_gelu`` that changes the backbone's activation drops the thresholds and the
        references, as ``reconfigure`` drops what a change invalidates."""
        config_file, weights_file = files[CONFIG_NAME], files[WEIGHTS_NAME]
        data = _read_config(config_file)
        data.pop(REFERENCES_KEY, None)  # the saved folder's record, not a model setting
        config = AnomalyCLIPConfig.from_dict(data, source=str(config_file))
        backbone_changed = quick_gelu is not None and quick_gelu != config.quick_gelu
        config = config.replace(quick_gelu=quick_gelu)
        if backbone_changed and (config.thresholds is not None or references_file is not None):
            logger.warning(
                "quick_gelu=%s changes the backbone the saved thresholds and references were taken with: dropping them. "
                "Calibrate (and add references) again.",
                quick_gelu,
            )
            config = dataclasses.replace(config, thresholds=None, threshold_mode=None)
            references_file = None
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"Cannot read {weights_file} as safetensors: {exc}") from exc
        clip = load_clip(config.backbone, quick_gelu=config.quick_gelu, cache_dir=cache_dir)
        model = cls(clip, config)
        model.load_prompts(tensors, source=str(weights_file))
        if references_file is not None:
            model._install_references(ReferenceMemory.load(references_file))
        model.reconfigure(**options.as_kwargs())
        return place_model(model, device, dtype)

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike,
        *,
        model_card: bool = True,
        repo_id: str | None = None,
    ) -> Path:
        """Write the model to a directory that :meth:`from_pretrained` loads.

        Files: ``config.json`` (sorted, indented; the inference options, the thresholds and what
        the prompts were trained on), ``model.safetensors`` (the prompts only),
        ``references.safetensors`` when the model has few-shot references (see
        :meth:`add_references`; together an inspection profile) and ``README.md``,
        a model card (:mod:`anomalyclip.card`). A ``README.md`` that this library did not write is
        kept as it is. Each file is written to a temporary name and renamed, so an interrupted
        save never leaves a half-written model.

        Args:
            save_directory: the directory (created if needed).
            model_card: write ``README.md`` (default True).
            repo_id: the Hub repo id shown in the card's usage snippet (default: the directory).

        Returns:
            the directory.
        """
        directory = Path(save_directory)
        self._save_pretrained(directory)
        if model_card:
            write_model_card(directory, self.config, location=repo_id or os.fspath(save_directory))
        return directory

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``model.safetensors``, ``references.safetensors`` (or remove a stale one) and ``config.json``."""
        model: Any = self
        if not model.config.backbone.startswith(("hf-hub:", "local-dir:")):
            logger.warning(
                "Saving a model whose backbone is recorded as %r: set model.config.backbone to the 'hf-hub:' or "
                "'local-dir:' reference of its CLIP, or from_pretrained cannot rebuild it.",
                model.config.backbone,
            )
        references = model.references
        if references is not None:  # a profile whose references cannot run is never written
            references.check_compatible(**model._reference_settings())
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.prompts.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "library": "anomalyclip"})
        references_file = directory / REFERENCES_NAME
        if references is not None:
            references.save(references_file)
        elif references_file.exists():
            references_file.unlink()  # never leave another profile's references beside these prompts
        data = json.loads(model.config.to_json())
        data[REFERENCES_KEY] = REFERENCES_NAME if references is not None else None
        with atomic_write(directory / CONFIG_NAME, "w") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload AnomalyCLIP prompts",
    ) -> str:
        """Save into a temporary directory and upload it to a Hub model repo in one commit.

        Uploads ``config.json``, ``model.safetensors``, ``references.safetensors`` when the model
        has references, and the model card ``README.md`` (see :meth:`save_pretrained`), whose usage
        snippet names ``repo_id``. The same commit deletes a ``references.safetensors`` left in the
        repo by an earlier push that the model no longer has (as :meth:`save_pretrained` does in a
        folder). A ``README.md`` already in the repo that this library did not write is kept (the
        card is not uploaded), as is every other file of the repo.

        Args:
            repo_id: ``org/name``; the repo is created if needed.
            private: visibility of a newly created repo.
            token: Hub token (None: the logged-in user's), as in ``huggingface_hub``.
            revision: branch to commit to.
            commit_message: the commit's message.

        Returns:
            the URL of the commit.
        """
        from huggingface_hub import HfApi

        if not isinstance(repo_id, str) or not is_repo_id(repo_id):
            raise InvalidInputError(f"repo_id must be 'org/name' (e.g. 'my-org/anomalyclip-bottles'), got {repo_id!r}.")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        keep_theirs = False
        if api.file_exists(repo_id, MODEL_CARD_NAME, repo_type="model", revision=revision):
            remote = api.hf_hub_download(repo_id, MODEL_CARD_NAME, repo_type="model", revision=revision)
            keep_theirs = not is_generated_card(Path(remote).read_text(encoding="utf-8", errors="replace"))
            if keep_theirs:
                logger.info("Keeping the README.md of %s: it was not written by anomalyclip.", repo_id)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_card=not keep_theirs, repo_id=repo_id)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
                allow_patterns=list(SAVED_FILES),
                delete_patterns=[REFERENCES_NAME],  # uploaded files are never deleted: only a stale one goes
            )
        return str(getattr(info, "commit_url", info))


def _read_config(config_file: Path) -> dict[str, Any]:
    """The JSON object of a saved ``config.json`` (a :class:`CheckpointError` if unreadable)."""
    try:
        data = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Cannot read {config_file}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(data).__name__}.")
    return data


def _missing_file(where: str, name: str, *, hub: str | None, offline: bool, named: bool = False) -> Exception:
    """The error for a file of a saved model that ``where`` lacks (``named``: one its config names)."""
    why = f"its {CONFIG_NAME} names it" if named else f"a saved model needs {CONFIG_NAME} and {WEIGHTS_NAME}"
    if hub is None:
        return CheckpointError(
            f"{where} has no {name}, but {why}. Copy the whole folder written by save_pretrained "
            f"({', '.join(SAVED_FILES[:-1])}), or save the model again."
        )
    if offline:
        return WeightsNotFoundError(
            f"Cannot load {where}: {name} is not in the local Hugging Face cache, and {why} (offline: "
            f"HF_HUB_OFFLINE=1 or local_files_only=True). Download the whole repo once with network access "
            f"(`hf download {hub}`) or point cache_dir/HF_HUB_CACHE at a cache that has it; loading without "
            "it would silently change the model's decisions."
        )
    return CheckpointError(
        f"{where} has no {name}, but {why}. Push the model again (model.push_to_hub('{hub}')), or load the "
        "revision that has it (revision=...)."
    )


def _references_file(folder: Path, where: str, *, hub: str | None, offline: bool) -> Path | None:
    """The references file of a saved model in ``folder``, by its config's record (see the module)."""
    record = _read_config(folder / CONFIG_NAME).get(REFERENCES_KEY, _UNRECORDED)
    candidate = folder / REFERENCES_NAME
    if record is _UNRECORDED:  # written before the record: the file decides, as in anomalyclip 0.2
        if candidate.is_file():
            return candidate
        if offline:
            logger.warning(
                "Cannot check %s for few-shot references (%s) offline: the profile's config.json (written before "
                "anomalyclip 0.3) does not record them and they are not in the local cache. Loading without them.",
                where,
                REFERENCES_NAME,
            )
        return None
    if record is None:
        if candidate.is_file():
            logger.info("Ignoring %s in %s: its config.json records no references.", REFERENCES_NAME, where)
        return None
    if record != REFERENCES_NAME:
        raise CheckpointError(
            f"{where}: {CONFIG_NAME} records references {record!r}; expected {REFERENCES_NAME!r} or null. Save the "
            "model again."
        )
    if not candidate.is_file():
        raise _missing_file(where, REFERENCES_NAME, hub=hub, offline=offline, named=True)
    return candidate
