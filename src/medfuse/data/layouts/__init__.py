"""Dataset layouts -> :class:`Case` records (DESIGN "data/layouts.py"; one module per layout).

:func:`load_cases` (``load.py``) detects the layout of a folder or file and calls its reader;
every reader returns a :class:`CaseTable` of :class:`Case` records (``cases.py``). Readers:
``manifest.py`` (also :func:`write_manifest`), ``nnunet.py``, ``msd.py``, ``brats.py``,
``busbra.py``, and for the datasets the seeds name ``cellmap.py``, ``nsclc.py``, ``ctrate.py``,
``omniabnorm.py``.

These on-disk layouts are understood and auto-detected:

``manifest``
    A CSV or JSON table, one row per case. Columns: ``case_id`` (required), ``patient_id``
    (optional; when absent every case is its own patient), one column per modality named
    ``image_<modality>`` (e.g. ``image_t1``), and optional ``mask`` (segmentation label map),
    ``label`` (case-level class or value), ``text`` (report text), ``split``
    (``train``/``val``/``test`` or empty) and ``channel_<modality>`` (channel of a multi-channel
    file). Any other column is kept in :attr:`Case.extra`. Relative paths are relative to the
    manifest's folder. An empty image cell means that modality is absent for that case.

    A sidecar ``dataset.yaml`` (or ``dataset.yml`` / ``dataset.json``) next to the manifest may
    declare ``modalities`` (list; then a modality column may also be named just ``<modality>``),
    ``mask_labels`` (``{name: value}`` or a list of values), ``class_names`` (list),
    ``mask_required`` (bool) and ``resample_modalities`` (bool: modalities on different grids are
    expected and resampled onto the first one's grid, so ``data check`` does not report them). The JSON form is either a list of row objects or
    ``{"cases": [...], <sidecar keys>}``; a JSON row may also give ``"images": {modality: path}``.
``nnunet``
    nnU-Net v2 raw: ``dataset.json`` with ``channel_names`` and ``file_ending``;
    ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``, optional ``imagesTs``
    (split ``test``).
``msd``
    Medical Segmentation Decathlon: ``dataset.json`` with ``modality``, ``labels``
    (value -> name), ``training`` and ``test``; multi-modal images are 4D files, so every modality
    maps to the same path and :attr:`Case.channel_index` says which channel.
``brats``
    BraTS case folders ``<root>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` or BraTS 2023+
    ``<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (mapped to flair, t1, t1ce, t2).

``busbra``
    BUS-BRA (Zenodo 8231412): ``bus_data.csv`` (read BOM-safe, header names stripped) with ``ID``,
    ``Case`` (the patient), ``Pathology``, ``BIRADS``, ``Histology``, ``Device``, ``Side`` and ``BBOX``
    (``"[x, y, w, h]"``); images ``Images/<ID>.png``, masks ``Masks/mask_<ID without "bus_">.png``
    (0/255, required). One modality ``us``. Extra fields for ``data.params.text_template``:
    ``birads``, ``pathology``, ``histology``, ``device``, ``side``; ``box_x0..box_y1`` (inclusive
    pixels) from ``BBOX``; ``fold`` from the official ``5-fold-cv.csv`` when it is present.

The datasets the seeds name are read from their file names, CSV/JSON tables and, where pairing
needs it, DICOM headers; the facts about each are in REFERENCE.md ("Datasets the seeds name").

``cellmap`` (seed 004)
    ``<root>/<ds>/<ds>.zarr`` (or ``<root>/<ds>.zarr``, or the ``.zarr`` itself) with
    ``recon-*/em/<raw>/s0..`` and ``recon-*/labels/groundtruth/crop<N>/<class>/s0..``. One case per
    crop (``<ds>_crop<N>``); the patient is the dataset (crops of one sample stay in one split).
    ``images["raw"]`` is the EM multiscales group, ``mask`` the crop group; ``extra`` holds
    ``dataset``, ``crop`` and ``classes`` (``;``-joined). Read with
    :func:`medfuse.data.containers.read_cellmap_crop`.
``nsclc`` (seed 002, NSCLC-Radiogenomics from TCIA)
    A clinical CSV in the root (header names stripped; keyed by ``Case ID``) and one folder per
    patient (``AMC-*``, ``R01-*``, at the root or one level down) holding series folders. The SEG
    series (an early 3D Slicer SEG) names its CT through ``ReferencedSeriesSequence``; one header per
    series folder is read to pair them. One case per patient with a SEG: ``images["ct"]`` the CT
    series folder, ``mask`` the SEG file; ``extra`` holds every CSV column in snake case plus
    ``histology``, ``t_stage``, ``n_stage``, ``m_stage``. Patients without a SEG or a CSV row are left
    out (a note says how many).
``ctrate`` (seed 001)
    CT-RATE: a reports CSV (``VolumeName``, ``Findings_EN``, ``Impressions_EN``) in the root or one
    folder down, volumes ``**/<VolumeName>`` (``train_N_a_M.nii.gz``: patient ``train_N``), optional
    region masks ``masks/<VolumeName>`` and a metadata CSV (``RescaleSlope``, ``RescaleIntercept``).
``omniabnorm`` (seed 001, OmniAbnorm-CT)
    A JSON dict keyed by sample id whose records hold ``image`` (a folder with the centre slice
    ``0.jpeg`` and neighbours named by offset), ``context`` (the offsets), ``mask`` (a folder with one
    ``<finding id>.jpeg`` per finding) and ``abnormality`` (``id``, ``group_id``, ``label``,
    ``description``, ...; none = normal). One case per sample; the patient is the image folder's
    parent (the source scan), so neighbouring slices of one scan stay together. Ids that are not
    names have their other characters replaced by ``_``.

Loading only lists paths; nothing is read, so ``medfuse data check`` can report every bad file.
"""

from __future__ import annotations

from medfuse.data.layouts.brats import BRATS_LABELS_2023, BRATS_LABELS_CLASSIC, BRATS_MODALITIES
from medfuse.data.layouts.busbra import BUSBRA_CSV, BUSBRA_FOLDS
from medfuse.data.layouts.cases import LAYOUTS, SPLITS, Case, CaseTable, read_csv_rows, safe_id, snake
from medfuse.data.layouts.load import LOADERS, case_where, load_cases
from medfuse.data.layouts.manifest import MANIFEST_NAMES, SIDECAR_KEYS, SIDECAR_NAMES, write_manifest

__all__ = ["BRATS_LABELS_2023", "BRATS_LABELS_CLASSIC", "BRATS_MODALITIES", "BUSBRA_CSV", "BUSBRA_FOLDS", "LAYOUTS",
           "LOADERS", "MANIFEST_NAMES", "SIDECAR_KEYS", "SIDECAR_NAMES", "SPLITS", "Case", "CaseTable", "case_where",
           "load_cases", "read_csv_rows", "safe_id", "snake", "write_manifest"]
