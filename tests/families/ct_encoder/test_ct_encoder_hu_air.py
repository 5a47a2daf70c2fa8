"""ct_encoder HU guard, both ways: a volume read as HU (``hu: none``) whose air sits near 0 holds
stored values (CT-RATE v1) and is refused; fill outside the scan circle (-1024/-2048/-3024 HU, -2000
or -1024 stored) neither hides nor fakes air; ``hu_check: false`` opts out for data without air. And
CSV errors name the physical line a record starts on (CT-RATE's findings span several lines)."""

from __future__ import annotations

import csv
import re

import nibabel as nib
import numpy as np
import pytest
from test_ctrate import AFFINE, CONFIGS, SHAPE, TINY, make_ctrate  # same folder (pytest prepend mode)

from medfuse.errors import DataError
from medfuse.families.ct_encoder.data import read_ctrate
from medfuse.families.ct_encoder.params import CTEncoderDataParams
from medfuse.families.ct_encoder.transforms import case_item, ct_transforms

REPORTS = "radiology_text_reports/train_reports.csv"
META = "metadata/train_metadata.csv"
LABELS = "multi_abnormality_labels/train_predicted_labels.csv"


def _cfg(root, config="ct_encoder_ctrate.yaml", *overrides):
    from medfuse.config import load_config

    return load_config(CONFIGS / config, [f"data.root={root}", *TINY, "data.transforms.intensity.ct={kind: none}",
                                          *overrides])  # no window: the values the HU step leaves


def _load(root, config="ct_encoder_ctrate.yaml", *overrides, volume="train_1_a_1"):
    """One volume through the ct_encoder chain as ``config`` reads it (HU step right after loading)."""
    from medfuse.engine.build import build_datamodule

    cfg = _cfg(root, config, *overrides)
    dm = build_datamodule(cfg)
    case = next(c for c in dm.table.cases if c.case_id == volume)
    return ct_transforms(cfg, train=False)(case_item(case))


def _volumes(root):
    return sorted((root / "train").rglob("*.nii.gz"))


def _rewrite(root, fn, header=None):
    """Replace every volume's values (D, H, W) by ``fn(values)``; ``header``: (scl_slope, scl_inter)."""
    for f in _volumes(root):
        arr = np.asarray(nib.load(str(f)).dataobj).transpose(2, 1, 0)
        img = nib.Nifti1Image(np.ascontiguousarray(fn(arr).astype(np.int16).transpose(2, 1, 0)), AFFINE)
        nib.save(img, str(f))
        if header is not None:
            _set_header_scaling(f, *header)


def _set_header_scaling(path, slope, inter):
    """Write scl_slope/scl_inter into a .nii.gz (nibabel resets them when saving an in-memory array)."""
    import gzip
    import struct

    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[112:120] = struct.pack("<ff", slope, inter)  # NIfTI-1 header offsets of scl_slope, scl_inter
    path.write_bytes(gzip.compress(bytes(raw)))


def _outside_circle(fill):
    """Set the corners outside the scan circle (about 21% of each slice) to ``fill``."""
    _, h, w = SHAPE
    yy, xx = np.mgrid[:h, :w]
    outside = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) > min(h, w) / 2

    def fn(arr):
        arr = arr.copy()
        arr[:, outside] = fill
        return arr

    return fn


V1_REFUSED = (r"train_1_a_1\.nii\.gz: read as HU \(data\.params\.hu=none\), but its 1st percentile is -?\d+.*: "
              r"air should be near -1000 HU\. Fix: the volume holds stored values \(CT-RATE v1\): set "
              r"data\.params\.hu=metadata with the metadata CSV, or fixed with hu_slope/hu_intercept")


def test_v1_stored_values_under_the_v2_config_are_refused_naming_the_file(tmp_path):
    """CT-RATE v1 volumes (air near 0, tissue near 1064) read with hu: none trained 1024 HU off, silently."""
    root = make_ctrate(tmp_path / "dataset", n_patients=3, v1=True)
    with pytest.raises(DataError, match=V1_REFUSED) as e:
        _load(root)
    seen = float(re.search(r"1st percentile is (-?\d+)", str(e.value))[1])
    assert "\n" not in str(e.value) and -20 <= seen <= 20  # air: -1024 HU + noise, stored +1024
    # the same files as v1 (slope/intercept from the metadata CSV) are HU after the step
    out = _load(root, "ct_encoder_ctrate_v1.yaml")["image"]
    assert -1100 < float(np.percentile(out.numpy(), 1)) < -900


def test_fill_outside_the_scan_circle_neither_hides_nor_fakes_air(tmp_path):
    """Fill is the volume's minimum: left out, so -2000 stored (GE: -3024 HU) does not pass a v1 file
    as HU, and a correctly converted v1 file padded with -3024 HU is not taken for a second rescale."""
    for fill in (-1024, -2048, -3024):  # v2 (HU) volumes padded as scanners pad them: read as they are
        root = make_ctrate(tmp_path / f"v2{fill}", n_patients=3)
        _rewrite(root, _outside_circle(fill))
        assert float(_load(root)["image"].min()) <= fill
    for stored_fill in (-2000, -1024, 0):  # v1 volumes, padding stored below air (HU -3024, -2048, -1024)
        root = make_ctrate(tmp_path / f"v1{stored_fill}", n_patients=3, v1=True)
        _rewrite(root, _outside_circle(stored_fill))
        with pytest.raises(DataError, match=V1_REFUSED) as e:
            _load(root)
        assert (f"(the voxels at the minimum, {stored_fill}, left out as fill)" in str(e.value)) == (stored_fill < 0)
        out = _load(root, "ct_encoder_ctrate_v1.yaml")["image"]  # converted once: fill at -3024 HU is no error
        assert float(out.min()) <= stored_fill - 1024
    # a v2 volume padded with -3024 and rescaled again is still refused
    root = make_ctrate(tmp_path / "v2twice", n_patients=3)
    _rewrite(root, _outside_circle(-3024))
    with pytest.raises(DataError, match=r"1st percentile is -20\d\d HU after slope/intercept.*far below air"):
        _load(root, "ct_encoder_ctrate_v1.yaml")


def test_air_level_statistic():
    from medfuse.data.hu import air_level

    rng = np.random.default_rng(0)
    hu = np.full((1, 16, 40, 40), -1000.0) + rng.normal(0, 15, (1, 16, 40, 40))
    hu[:, :, 10:30, 5:35] = 40.0  # body
    hu[:, :, 14:26, 8:18] = -850.0  # a lung
    level, fill = air_level(hu)
    assert -1060 < level < -990 and fill is None
    hu[:, :, :3] = -3024.0  # fill: left out and named
    level, fill = air_level(hu)
    assert -1060 < level < -990 and fill == -3024.0
    level, fill = air_level(hu + 1024)
    assert -60 < level < 30 and fill == -2000.0
    assert np.isnan(air_level(np.full((1, 2, 2, 2), np.nan))[0])


def test_hu_check_false_reads_a_volume_without_air(tmp_path):
    """A CT cropped to the body has no air: refused by default with the way out, read as is with hu_check=false."""
    root = make_ctrate(tmp_path / "dataset", n_patients=3)

    def body_only(arr):  # soft tissue only, no air and no lung, in HU
        return np.full_like(arr, 40) + (arr % 7)

    _rewrite(root, body_only)
    with pytest.raises(DataError, match=r"1st percentile is 4\d.*set data\.params\.hu_check=false$"):
        _load(root)
    out = _load(root, "ct_encoder_ctrate.yaml", "data.params.hu_check=false")["image"]
    assert 40 <= float(out.min()) and float(out.max()) <= 46


def test_a_header_rescale_is_applied_before_the_check(tmp_path):
    """nibabel applies scl_slope/scl_inter on reading: stored v1 values with intercept -1024 in the header
    are HU under hu: none; a header that leaves air near 0 is refused naming the header's rescale."""
    root = make_ctrate(tmp_path / "ok", n_patients=3, v1=True)
    _rewrite(root, lambda a: a, header=(1.0, -1024.0))
    out = _load(root)["image"]
    assert -1100 < float(np.percentile(out.numpy(), 1)) < -900
    root = make_ctrate(tmp_path / "bad", n_patients=3, v1=True)
    _rewrite(root, lambda a: a // 2, header=(2.0, 0.0))
    with pytest.raises(DataError, match=r"1st percentile is -?\d+ after its header's slope 2/intercept 0: air should be near -1000 HU"):
        _load(root)


# ------------------------------------------------------------------------ CSV lines


def _write(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path.read_text(encoding="utf-8")


def _line_of(text, needle):
    """The physical line (1-based) of the line that starts with ``needle``."""
    return next(i for i, ln in enumerate(text.split("\n"), start=1) if ln.startswith(needle))


def _params(**kw):
    return CTEncoderDataParams(**{"reports": REPORTS, "metadata": None, "labels": None, "cot": None, **kw})


def test_csv_errors_name_the_file_line_where_the_record_starts(tmp_path):
    """CT-RATE's findings span several lines inside quotes: 'line N' counted records, not file lines."""
    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    path = root / REPORTS
    rows = list(csv.DictReader(path.open(encoding="utf-8-sig")))
    rows[0]["Findings_EN"] = "Trachea patent.\nA nodule in the left lung.\n\nHeart normal."  # 4 lines
    bad = next(r for r in rows if r["VolumeName"] == "train_2_a_1.nii.gz")
    bad["Findings_EN"] = bad["Impressions_EN"] = ""
    text = _write(path, rows)
    line = _line_of(text, "train_2_a_1.nii.gz")
    assert line == 7  # header, 4 lines of record 1, record 2 (train_1_a_2), then the bad one (record 3)
    with pytest.raises(DataError, match=rf"train_reports\.csv \(line {line}\): volume train_2_a_1 has neither"):
        read_ctrate(root, _params())
    # the metadata CSV: a bad slope is named with its line
    bad["Findings_EN"] = "Fine."
    _write(path, rows)
    meta = list(csv.DictReader((root / META).open(encoding="utf-8-sig")))
    meta[3]["RescaleSlope"] = "abc"  # train_2_a_2: reconstructions=all reads it
    meta[0]["XYSpacing"] = "[0.75,\n0.75]"  # a quoted field over two lines before it
    text = _write(root / META, meta)
    line = _line_of(text, "train_2_a_2.nii.gz")
    assert line == 6
    with pytest.raises(DataError, match=rf"train_metadata\.csv \(line {line}\): RescaleSlope.*train_2_a_2"):
        read_ctrate(root, _params(metadata=META, hu="metadata", reconstructions="all"))
    # the labels CSV: a cell that is no number was a ValueError traceback
    labels = list(csv.DictReader((root / LABELS).open(encoding="utf-8-sig")))
    labels[2]["Cardiomegaly"] = "yes"  # train_2_a_1
    text = _write(root / LABELS, labels)
    with pytest.raises(DataError, match=rf"train_predicted_labels\.csv \(line {_line_of(text, 'train_2_a_1')}\): "
                                        r"label 'Cardiomegaly' of train_2_a_1 is 'yes', not a number"):
        read_ctrate(root, _params(labels=LABELS))


def test_csv_records_keep_the_rows_of_the_plain_reader(tmp_path):
    from medfuse.data.layouts import read_csv_rows
    from medfuse.data.layouts.ctrate import read_csv_records

    path = tmp_path / "r.csv"
    path.write_bytes('\ufeffVolumeName, Findings_EN \r\n"a.nii.gz","one\r\ntwo"\r\n\r\nb.nii.gz\r\nc.nii.gz,x,extra\r\n'
                     .encode())
    records = read_csv_records(path)
    assert [n for n, _ in records] == [2, 5, 6]  # record a spans lines 2-3, line 4 is blank
    assert [r for _, r in records] == read_csv_rows(path)
    assert records[0][1] == {"VolumeName": "a.nii.gz", "Findings_EN": "one\r\ntwo"}
