"""``medfuse predict``: a trained run on new files.

A :class:`Predictor` turns the command's inputs into cases, runs the task's inference on them and
writes one output per case. The output folder must be a writable folder (checked before the model is
loaded); every output file is built with :func:`medfuse.data.paths.output_path`, so a case id never
escapes it. Input cases pass the checks of ``medfuse data check`` (case ids, duplicate ids, and the
per-file rules while they are read); a 2D image given to a run trained on 3D volumes is refused. A family with its own inputs (text and boxes, any subset of
modalities, volume + region mask) subclasses a generic predictor (:mod:`medfuse.engine.predictors`:
classification, segmentation, embedding) and names it in its :class:`~medfuse.registry.ModelEntry`.

A refused case stops the whole prediction (one line, exit 2), unless ``skip_refused`` (``medfuse
predict --skip-refused``): then :meth:`Predictor.run` predicts the other cases one at a time and
lists each refused case in ``refused.csv`` (:func:`~medfuse.engine.outputs.record_refused`). The
per-case checks report through :meth:`Predictor.refuse`, so a family's own ``cases``/``batches``
need nothing for it.

The same predictors run a portable model package (``medfuse export``, :mod:`medfuse.engine.package`),
where there is no data set: a predictor class says what it reads from its run's data module
(:meth:`Predictor.package_state`, a JSON-able dict written into the package) and how to rebuild that
from the package (:meth:`Predictor.package_data`, on top of a :class:`PackagedData`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch

from medfuse.config import Config
from medfuse.data.inputs import image_shape
from medfuse.data.paths import check_case_id, output_dir, output_path
from medfuse.engine.build import family_of
from medfuse.engine.evaluate import check_eval_overrides, load_trained, to_device
from medfuse.engine.outputs import (
    INPUTS,
    REFUSED,
    check_inputs,
    record_inputs,
    record_refused,
)
from medfuse.engine.tasks import BaseTask
from medfuse.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class PackagedTable:
    """The part of a case table a predictor reads: class names and mask labels."""

    def __init__(self, class_names: list[str] | None, mask_labels: dict[str, int] | None):
        self.class_names = list(class_names) if class_names else None
        self.mask_labels = {str(k): int(v) for k, v in mask_labels.items()} if mask_labels else None


class PackagedData:
    """A data module's stand-in for a model package (no data set, no training cases).

    It has what the generic predictors read from a run's data module, rebuilt from the package's
    ``labels.json`` and ``preprocessing.json``; a family predictor adds its own attributes in
    :meth:`Predictor.package_data`.

    Attributes:
        modalities: modality names in channel order.
        mask_values: the label values a mask may hold (None: not declared).
        table: class names and mask labels (:class:`PackagedTable`).
        cases: always empty (a package carries no cases).
        reference_shape: (C, D, H, W) of the run's first training image (the 2D/3D check), or None.
    """

    def __init__(self, modalities: list[str], mask_values: list[int] | None, table: PackagedTable,
                 reference_shape: tuple[int, ...] | None = None):
        self.modalities = list(modalities)
        self.mask_values = [int(v) for v in mask_values] if mask_values is not None else None
        self.table = table
        self.cases: dict[str, list[Any]] = {}
        self.reference_shape = tuple(int(s) for s in reference_shape) if reference_shape else None


class Predictor:
    """Inputs -> cases -> batches -> files.

    Args:
        task: the trained task in eval mode.
        dm: the run's data module (modalities, class names), or the :class:`PackagedData` of a
            model package (see :meth:`package_data`).
        cfg: the run's resolved config.
    """

    postprocess_keys: ClassVar[tuple[str, ...]] = ()
    """The ``eval.postprocess`` options this predictor (and its family's evaluator) applies; setting
    another one is refused (:func:`~medfuse.engine.build.check_postprocess`)."""

    skip_refused: bool = False
    """Set by :meth:`run`: a refused case is noted (:meth:`refuse`) instead of stopping the run."""

    given_case_id: str | None = None
    """``--case-id`` of the current :meth:`run`, checked; :meth:`single_case_id` names the case by it."""

    def __init__(self, task: BaseTask, dm: Any, cfg: Config):
        self.task, self.dm, self.cfg = task, dm, cfg
        self.refused: list[tuple[Any, DataError]] = []  # (case, why) of the last run, in skip mode

    def single_case_id(self, default: str, where: str) -> str:
        """The id of the one case that a run's inputs hold: ``--case-id`` when given (a file or
        series folder whose own name is no case id, ``T2 AX/``, is then predicted under it), else
        ``default``, checked (its refusal names ``--case-id`` as the fix)."""
        if self.given_case_id is not None:
            return self.given_case_id
        try:
            return check_case_id(default, where)
        except DataError as e:
            raise DataError(e.where, e.problem, f"name the case with --case-id NAME, or {e.fix}") from None

    def refuse(self, case: Any, err: DataError) -> None:
        """A case that cannot be predicted: raise ``err`` (the default), or with :attr:`skip_refused`
        note it for ``refused.csv`` and go on with the other cases."""
        if not self.skip_refused:
            raise err
        self.refused.append((case, err))

    # -------------------------------------------------------------------------- model packages
    @classmethod
    def package_labels(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        """The label and modality metadata of the run (the package's ``labels.json``, which
        :class:`PackagedData` is rebuilt from): modalities in channel order, class names, mask
        labels and the mask values a case may hold (and, optionally, ``output_labels``: the values
        written label maps hold, when not ``mask_labels``). A family data module without
        ``mask_values`` has its predictor override this."""
        table = dm.table
        return {"modalities": list(dm.modalities), "class_names": table.class_names, "mask_labels": table.mask_labels,
                "mask_values": dm.mask_values}

    @classmethod
    def package_state(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        """What this predictor reads from the run's data module beyond :class:`PackagedData`, as a
        JSON-able dict (written to the package's ``predictor.json`` by ``medfuse export``).

        The generic predictors need nothing more; a family predictor that reads family state
        (regions, a feature builder's settings, ...) overrides this and :meth:`package_data`.
        """
        return {}

    @classmethod
    def package_data(cls, data: PackagedData, cfg: Config, state: dict[str, Any]) -> Any:
        """The object this predictor uses as ``self.dm`` when it runs a package: ``data`` (the
        generic part) completed with ``state`` (what :meth:`package_state` wrote)."""
        return data

    @classmethod
    def portable_config(cls, cfg: Config) -> Config:
        """The run's config as a package runs it: paths that only the training machine needs are
        dropped: ``model.weights`` (the package's weights replace the initial ones), ``data.cache_dir``
        and every ``model.params`` key named ``*cache`` (disk caches). A family whose ``model.params``
        name a weights file that its trained state dict covers overrides this to drop that key too."""
        params = {k: (None if k.endswith("cache") else v) for k, v in cfg.model.params.items()}
        model = cfg.model.model_copy(update={"weights": None, "params": params})
        return cfg.model_copy(update={"model": model, "data": cfg.data.model_copy(update={"cache_dir": None})})

    def cases(self, inputs: list[str], modalities: list[str] | None) -> list[Any]:
        """Inputs -> cases. Accepted: a folder of nnU-Net-style images (``<case>_<XXXX>.<ending>``,
        channel ``i`` = the run's ``i``-th modality; e.g. ``imagesTs``), a dataset folder with
        ``dataset.json`` + ``imagesTs`` (its test images; for MSD the ``test`` list, 4D files split
        into the modalities), a manifest/dataset path (all its cases), several nnU-Net-style files
        (grouped into cases), or one image per modality of one case (a file or a DICOM series
        folder, in the run's order or the ``modalities`` given; its id is the first file's nnU-Net
        case id, or the series folder's name)."""
        from medfuse.data.checks import validate_table
        from medfuse.data.inputs import (
            case_id_of,
            channel_of,
            dataset_test_folder,
            image_cases,
            image_files,
            is_dicom_series,
            is_image_folder,
        )
        from medfuse.data.layouts import Case, load_cases
        from medfuse.data.layouts.msd import msd_test_cases

        mods = self.dm.modalities
        for p in inputs:
            if not Path(p).exists():
                raise DataError(p, "file not found", "check the path")
        if len(inputs) == 1 and Path(inputs[0]).is_dir():
            folder = Path(inputs[0])
            msd = msd_test_cases(folder)  # an MSD dataset (or its imagesTs): its unlabelled test list
            if msd is not None:
                self.check_dims(msd)
                return msd
            folder = dataset_test_folder(folder) or folder
            if is_image_folder(folder):
                cases = image_cases(image_files(folder), list(mods))
                self.check_dims(cases)
                return cases
        if len(inputs) == 1 and (Path(inputs[0]).is_dir() or Path(inputs[0]).suffix in (".csv", ".json")) \
                and not is_dicom_series(Path(inputs[0])):  # a series folder is one image, read below
            cases = validate_table(load_cases(inputs[0], modalities=mods)).cases
            self.check_dims(cases)
            return cases
        if modalities is None and all(channel_of(p) is not None for p in inputs) \
                and len({case_id_of(p) for p in inputs}) > 1:
            cases = image_cases([Path(p) for p in inputs], list(mods))
            self.check_dims(cases)
            return cases
        given = modalities or mods[: len(inputs)]
        if len(given) != len(inputs):
            raise DataError(" ".join(inputs), f"{len(inputs)} inputs for modalities {given}",
                            f"give one file per modality in the order {mods} or name them with --modalities")
        unknown = [m for m in given if m not in mods]
        if unknown:
            raise DataError(unknown[0], "not a modality of this run", f"use some of: {', '.join(mods)}")
        first = Path(inputs[0])
        name = self.single_case_id(first.name if first.is_dir() else case_id_of(first), inputs[0])  # a series: its folder
        cases = [Case(case_id=name, patient_id=name, images=dict(zip(given, inputs, strict=True)))]
        self.check_dims(cases)
        return cases

    partial_modalities: ClassVar[bool] = False
    """Whether a case may lack some of the run's modalities (a family built for missing modalities,
    such as incomplete_seg, says True); otherwise such a case is refused before anything runs (it
    used to be filled with zeros and predicted without a word)."""

    def check_complete(self, cases: list[Any]) -> None:
        """Refuse a case without every modality the run was trained on (unless :attr:`partial_modalities`)."""
        from medfuse.data.layouts import Case

        if self.partial_modalities:
            return
        mods = list(self.dm.modalities)
        for c in (c for c in cases if isinstance(c, Case)):  # a family's own records check themselves
            missing = [m for m in mods if not c.images.get(m)]
            if missing:
                where = next((v for v in c.images.values() if v), c.case_id)
                files = {v for v in c.images.values() if v}
                if len(files) == 1 and Path(where).is_file() and image_shape(where)[0] == len(mods) > 1:
                    raise DataError(where, f"holds {len(mods)} channels in one file, but this input gives it as the "
                                    f"'{next(iter(c.images))}' image alone (the run takes {', '.join(mods)})",
                                    "give the dataset folder (an MSD test list is split into the modalities), or a "
                                    "manifest with channel_<modality> columns naming each channel")
                raise DataError(where, f"case {c.case_id} has no {' / '.join(missing)} image; the run was trained on "
                                f"{', '.join(mods)}", f"give every modality ({', '.join(mods)}) for each case")

    def check_dims(self, cases: list[Any]) -> None:
        """Refuse a 2D image (one slice) when the run was trained on 3D volumes, and the reverse.

        The reference is the first image of the run's first training case; NIfTI headers are
        read without the voxels.
        """
        from medfuse.data.checks import dims_problem, raise_first

        ref_shape = self.reference_shape()
        if ref_shape is None:
            return
        for c in cases:
            try:  # a file that cannot be read is refused here too (its header is read)
                for m, path in c.images.items():
                    if path and Path(path).exists():
                        raise_first([p for p in [dims_problem("the run's training images", ref_shape,
                                                              f"image '{m}'", image_shape(path), path, c.case_id)]
                                     if p is not None])
            except DataError as e:
                self.refuse(c, e)

    def reference_shape(self) -> tuple[int, ...] | None:
        """(C, D, H, W) of the run's first training image (a package stores it), or None."""
        if isinstance(self.dm, PackagedData):
            return self.dm.reference_shape
        return training_image_shape(self.dm)

    def batches(self, cases: list[Any]):
        """Cases -> transformed, collated batches on the task's device."""
        from medfuse.data.datamodule import collate
        from medfuse.data.transforms import build_transforms, case_to_item

        mods = self.dm.modalities
        tf = build_transforms(self.cfg.data.transforms, mods, train=False, has_mask=False,
                              mask_values=self.dm.mask_values, crop_eval=self.cfg.task != "segmentation")
        # whole volumes are read one batch at a time (memory), the others by the batch size
        bs = 1 if self.cfg.task == "segmentation" else max(1, self.cfg.data.eval_batch_size or self.cfg.data.batch_size)
        for i in range(0, len(cases), bs):
            items = [tf(case_to_item(c, mods)) for c in cases[i: i + bs]]
            yield to_device(collate(items), self.task.device)

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One forward pass over a batch (default: the task's inference path)."""
        return self.task.infer(batch)

    def case_inputs(self, case: Any) -> tuple[str, dict[str, str]] | None:
        """(case id, {modality: input path}) of a case, for ``inputs.csv``
        (:func:`~medfuse.engine.outputs.record_inputs`); None for a family's own record type."""
        from medfuse.data.layouts import Case

        if not isinstance(case, Case):
            return None
        return case.case_id, {m: p for m, p in case.images.items() if p}

    def write(self, batch: dict[str, Any], out: dict[str, Any], out_dir: Path) -> None:
        """Write one batch's predictions."""
        raise NotImplementedError

    def finish(self, out_dir: Path) -> None:
        """Called once after the last batch (e.g. to write a table)."""

    def run(self, inputs: list[str], out_dir: Path, modalities: list[str] | None = None,
            progress: bool = False, case_id: str | None = None, skip_refused: bool = False) -> Path:
        """Predict every case of ``inputs`` into ``out_dir``.

        Args:
            inputs: what :meth:`cases` takes.
            out_dir: the output folder.
            modalities: which modalities ``inputs`` are, when not all of them.
            progress: show a progress bar over cases.
            case_id: the name of the one case that ``inputs`` hold (its outputs are named by it).
            skip_refused: a case refused by a :class:`~medfuse.errors.DataError` (the 2D/3D and
                missing-modality checks, or an error while its files are read and transformed in
                :meth:`batches` or while it is inferred) is skipped instead of stopping the run: it
                gets no output and no ``inputs.csv`` record, and a row of ``refused.csv`` (case_id,
                file, problem, fix).
                The other cases are predicted one per batch (batch size 1), each into the same
                files as without the flag, and one line on stderr says how many were refused.
                Errors that are not about one case (no case at all, a case id another run
                predicted from other files, an output table among the inputs) still stop it.

        Returns:
            ``out_dir``.

        Raises:
            DataError: a refused case (without ``skip_refused``), or every case refused (with it;
                ``refused.csv`` lists them).
        """
        output_dir(out_dir)
        self.skip_refused, self.refused = skip_refused, []
        self.given_case_id = None if case_id is None else check_case_id(str(case_id), "--case-id")
        cases = self.cases(list(inputs), modalities)  # the 2D/3D check runs here (check_dims)
        if not cases:
            raise DataError(" ".join(map(str, inputs)), "holds no case to predict",
                            "give an imagesTs folder, a manifest with rows, or image files")
        if case_id is not None:
            if len(cases) != 1:
                raise ConfigError("--case-id", f"names one case, but the inputs hold {len(cases)}",
                                  "give the images of one case, or leave --case-id out")
            name = self.given_case_id
            renamed = dataclasses.replace(cases[0], case_id=name, patient_id=name)
            self.refused = [(renamed if c is cases[0] else c, e) for c, e in self.refused]
            cases = [renamed]
        if skip_refused:
            for c in self.pending(cases):
                try:
                    self.check_complete([c])
                except DataError as e:
                    self.refuse(c, e)
        else:
            self.check_complete(cases)
        for name in (INPUTS, "predictions.csv", REFUSED):  # the tables this folder keeps never replace an input
            target = output_path(out_dir, name)
            if any(Path(i).resolve() == target.resolve() for i in inputs):
                raise DataError(target, f"is an input of this prediction; the output '{name}' would replace it",
                                "write the predictions to another folder (--out)")
        todo = self.pending(cases)
        # a case id this folder already holds from other files is refused before anything is written;
        # each case is recorded once its files have been read (a case refused then is never recorded,
        # so the mended inputs' rerun does not meet a record of a prediction that never happened)
        records = dict(x for c in todo if (x := self.case_inputs(c)) is not None)
        check_inputs(out_dir, records)
        from rich.progress import Progress

        with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
            job = bar.add_task("predict", total=len(cases))
            if skip_refused:
                bar.advance(job, len(cases) - len(todo))
                for c in todo:
                    self.predict_one(c, out_dir)
                    bar.advance(job, 1)
            else:
                for batch in self.batches(cases):
                    self.note_resampled(batch)
                    self.record(out_dir, records, batch.get("case_id", []))
                    self.write(batch, self.infer(batch), out_dir)
                    bar.advance(job, len(batch.get("case_id", [None])))
        done = [str(c.case_id) for c in self.pending(cases)]
        refused = [(str(c.case_id), e) for c, e in self.refused]
        if refused and not done:
            path = record_refused(out_dir, refused, done)
            first = refused[0][1]
            raise DataError(path, f"every case was refused ({len(cases)} of {len(cases)}; the first, "
                            f"{refused[0][0]}: {first.where}: {first.problem})",
                            "fix or remove the files listed there and run again")
        self.finish(out_dir)
        path = record_refused(out_dir, refused, done)  # also: a case predicted now leaves the list
        if refused:
            print(f"{len(refused)} of {len(cases)} cases refused; listed in {path}", file=sys.stderr, flush=True)
        return out_dir

    @staticmethod
    def record(out_dir: Path, records: dict[str, dict[str, str]], case_ids: list[str]) -> None:
        """Add the input files of ``case_ids`` (those ``records`` holds) to ``inputs.csv``."""
        found = {str(c): records[str(c)] for c in case_ids if str(c) in records}
        if found:
            record_inputs(out_dir, found)

    def pending(self, cases: list[Any]) -> list[Any]:
        """``cases`` without those refused so far (:meth:`refuse`)."""
        out = {id(c) for c, _ in self.refused}
        return [c for c in cases if id(c) not in out]

    def predict_one(self, case: Any, out_dir: Path) -> None:
        """Read, infer, record and write one case (``skip_refused``): a
        :class:`~medfuse.errors.DataError` while its batch is built or inferred refuses the case
        (:meth:`refuse`) before anything of it is written."""
        try:
            done = [(batch, self.infer(batch)) for batch in self.batches([case])]  # one case: one batch
        except DataError as e:
            self.refuse(case, e)
            return
        self.record(out_dir, dict(x for x in [self.case_inputs(case)] if x is not None), [case.case_id])
        for batch, out in done:
            self.note_resampled(batch)
            self.write(batch, out, out_dir)

    @staticmethod
    def note_resampled(batch: dict[str, Any]) -> None:
        """One logged warning per case whose modalities were not on one grid and were resampled
        onto its first one (``batch["resampled"]``, from :class:`~medfuse.data.load.LoadCased`):
        ``medfuse data check`` reports such a case under ``grid``; predict goes on and says so."""
        for case, what in zip(batch.get("case_id", []), batch.get("resampled", []), strict=False):
            if what:
                log.warning("%s: %s", case, what)


def predict(run_dir: str | Path, inputs: list[str], out: str | Path,
            modalities: list[str] | None = None, overrides: list[str] | None = None,
            progress: bool = False, case_id: str | None = None, skip_refused: bool = False) -> Path:
    """Run a trained model on new files with its family's predictor; return the output folder.

    Args:
        run_dir: a trained run, or a model package written by ``medfuse export`` (``model.zip``;
            runs without the training data or the run folder).
        inputs: what the family's predictor takes (generic: one image per modality, or one
            manifest/dataset path).
        out: output folder.
        modalities: which modalities ``inputs`` are, when not all of them.
        overrides: ``eval.*=value`` overrides (ROI, overlap, TTA, ...) and ``data.dicom.*=value``
            (how the inputs' DICOM is read: ``on_gap``, ``series``, ...).
        progress: show a progress bar over cases.
        case_id: the name of the one case ``inputs`` hold (default: from the first file's name, or
            the DICOM series folder's).
        skip_refused: skip each case refused by a :class:`~medfuse.errors.DataError` (a 2D image
            among 3D volumes, a missing modality, an unreadable file, a DICOM series with a gap)
            instead of stopping at the first one; the others are predicted one per batch into the
            same files as without it, the refused ones are listed in ``out/refused.csv`` (case_id,
            file, problem, fix) and one stderr line counts them. If every case is refused it raises
            (after writing ``refused.csv``). See :meth:`Predictor.run`.

    Raises:
        DataError: a refused case (without ``skip_refused``); every case refused (with it).
        ConfigError: a bad override or ``case_id``.
    """
    from medfuse.data.dicom import use_dicom_options
    from medfuse.engine.build import check_postprocess
    from medfuse.engine.package import is_package, load_package

    output_dir(out)  # a file, or a folder that cannot be written: refused before the model loads
    overrides = check_predict_overrides(overrides)
    if is_package(run_dir):
        if any(o.split("=", 1)[0].strip() == "data.root" for o in overrides):
            raise ConfigError("data.root", "a model package reads no training data", "drop data.root=...")
        predictor = load_package(run_dir, overrides)
    else:
        cfg, dm, task = load_trained(run_dir, overrides=overrides)
        _, entry = family_of(cfg)
        check_postprocess(cfg, entry.predictor.postprocess_keys)
        predictor = entry.predictor(task, dm, cfg)
    with use_dicom_options(predictor.cfg.data.dicom):  # the run's (or package's) data.dicom, with overrides
        return predictor.run(list(inputs), Path(out), modalities, progress=progress, case_id=case_id,
                             skip_refused=skip_refused)


def check_predict_overrides(overrides: list[str] | None) -> list[str]:
    """``key=value`` overrides of ``medfuse predict``: those of evaluate (:func:`check_eval_overrides`:
    ``eval.*`` and ``data.dicom.*``, which changes only how the new inputs are read, e.g.
    ``data.dicom.on_gap=resample`` for a series with a missing slice)."""
    return check_eval_overrides(overrides)


def training_image_shape(dm: Any) -> tuple[int, ...] | None:
    """(C, D, H, W) of the first image of a data module's first training case, or None."""
    train = dm.cases.get("train") or []
    ref_path = next((p for c in train for p in c.images.values() if p), None)
    if ref_path is None or not Path(ref_path).exists():
        return None
    return image_shape(ref_path)
