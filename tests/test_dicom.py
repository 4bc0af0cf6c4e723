"""DICOM conversion: pydicom's bundled test files (native and compressed, with and without decoders) and DICOMs
written here with known pixels (12-bit windowing, MONOCHROME1 inversion, signed + rescale, VOI LUT, PHI)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from raddino.data.dicom import DicomReadOptions, allowed_fields, read_dicom
from raddino.data.imageio import SkipReason, UnusableImage
from raddino.data.preprocess import PreprocessOptions
from raddino.data.shard import build_shards
from raddino.data.shard_inputs import InputSet, SourceItem

ANY_MODALITY = DicomReadOptions(modalities=None)
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled with this pydicom")
    return Path(path)


def _require_decoder(path: Path) -> None:
    """Skip when the optional decoder plugins for this file's transfer syntax (the ``dicom`` extra) are missing."""
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if not get_decoder(syntax).is_available:
        pytest.skip(f"no decoder installed for {syntax.name} (pip install -e '.[dicom]')")


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    extra: dict[str, object] | None = None,
) -> Path:
    """Write a single-frame 16-bit-allocated DICOM whose raw 16-bit words are ``stored`` (uint16 bit patterns)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp_12bit(shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Every 12-bit value 0..4095 once (64 x 64), uint16."""
    return np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape) % 4096


def linear_window(x: float, center: float, width: float, y_min: float, y_max: float) -> float:
    """PS3.3 C.11.2.1.2.1 (LINEAR), written out independently of pydicom."""
    if x <= center - 0.5 - (width - 1) / 2:
        return y_min
    if x > center - 0.5 + (width - 1) / 2:
        return y_max
    return ((x - (center - 0.5)) / (width - 1) + 0.5) * (y_max - y_min) + y_min


# ------------------------------------------------------------------------------------------------------------------
# pydicom's bundled files


def test_lossless_compressed_files_decode_like_the_native_one() -> None:
    reference = read_dicom(_testfile("MR_small.dcm"), ANY_MODALITY)
    assert reference.pixels.shape == (64, 64) and reference.voi == "window"
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
    ):
        _require_decoder(_testfile(name))
        image = read_dicom(_testfile(name), ANY_MODALITY)
        np.testing.assert_array_equal(image.pixels, reference.pixels, err_msg=name)


def test_native_ct_applies_rescale_and_keeps_signed_values() -> None:
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64)
    expected = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = read_dicom(path, ANY_MODALITY)
    np.testing.assert_allclose(image.pixels, expected)
    assert image.voi == "none"
    # Theoretical range of signed 16-bit stored values through the rescale.
    lo = -(2**15) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hi = (2**15 - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert image.value_range == (lo, hi)


@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "JPEGLSNearLossless_16.dcm"]
)
def test_compressed_files_decode_with_plugins_installed(name: str) -> None:
    _require_decoder(_testfile(name))
    ds = pydicom.dcmread(_testfile(name))
    image = read_dicom(_testfile(name), ANY_MODALITY)
    assert image.pixels.shape == (ds.Rows, ds.Columns)
    assert np.isfinite(image.pixels).all() and image.pixels.max() > image.pixels.min()


def test_colour_dicom_becomes_bt601_luma() -> None:
    path = _testfile("SC_rgb_rle.dcm")
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(read_dicom(path, ANY_MODALITY).pixels, expected, atol=1e-3)


def test_truncated_pixel_data_is_reported_as_truncated() -> None:
    with pytest.raises(UnusableImage) as info:
        read_dicom(_testfile("MR_truncated.dcm"), ANY_MODALITY)
    assert info.value.reason is SkipReason.TRUNCATED


def test_file_cut_inside_the_header_is_truncated(tmp_path: Path) -> None:
    data = _testfile("CT_small.dcm").read_bytes()
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    offset = ds["PixelData"].file_tell  # cut just before the pixel data element's value
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: offset - 20])
    with pytest.raises(UnusableImage) as info:
        read_dicom(cut, ANY_MODALITY)
    assert info.value.reason is SkipReason.TRUNCATED


def test_policy_skips_modality_multiframe_and_no_pixel_data() -> None:
    with pytest.raises(UnusableImage) as info:
        read_dicom(_testfile("CT_small.dcm"))  # default: radiography modalities only
    assert info.value.reason is SkipReason.MODALITY
    with pytest.raises(UnusableImage) as info:
        read_dicom(_testfile("SC_rgb_rle_2frame.dcm"), ANY_MODALITY)
    assert info.value.reason is SkipReason.MULTI_FRAME
    with pytest.raises(UnusableImage) as info:
        read_dicom(_testfile("rtplan.dcm"), ANY_MODALITY)
    assert info.value.reason is SkipReason.NO_PIXEL_DATA


def test_multi_frame_first_keeps_frame_zero() -> None:
    path = _testfile("SC_rgb_rle_2frame.dcm")
    frame0 = pydicom.dcmread(path).pixel_array[0].astype(np.float64)
    expected = frame0 @ np.array([0.299, 0.587, 0.114])
    image = read_dicom(path, DicomReadOptions(modalities=None, multi_frame="first"))
    np.testing.assert_allclose(image.pixels, expected, atol=1e-3)


def test_missing_decoders_skip_and_count(tmp_path: Path) -> None:
    """In a fresh interpreter where the pylibjpeg plugins cannot be imported, JPEG-LS has no decoder: the builder
    skips it as no_decoder and still writes the RLE (pydicom's own decoder) and native files."""
    files = [_testfile(n) for n in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm")]
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        for name in ("pylibjpeg", "libjpeg", "openjpeg", "rle"):
            sys.modules[name] = None  # makes "import name" fail, as if the optional extra were not installed
        from raddino.data.dicom import DicomReadOptions
        from raddino.data.preprocess import PreprocessOptions
        from raddino.data.shard import build_shards
        from raddino.data.shard_inputs import InputSet, SourceItem
        files = {[str(f) for f in files]!r}
        inputs = InputSet([SourceItem(Path(f).name, Path(f)) for f in files], kind="list")
        summary = build_shards(inputs, out_dir=Path({str(tmp_path / "out")!r}), salt="saltsalt", progress=False,
                               options=PreprocessOptions(size=32, dicom=DicomReadOptions(modalities=None)))
        print(json.dumps({{"written": summary.written, "skipped": summary.skipped}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"written": 2, "skipped": {"no_decoder": 1}}
    # With the plugins importable (this process) all three are written.
    _require_decoder(files[2])
    inputs = InputSet([SourceItem(f.name, f) for f in files], kind="list")
    options = PreprocessOptions(size=32, dicom=ANY_MODALITY)
    summary = build_shards(inputs, out_dir=tmp_path / "out2", salt="saltsalt", options=options, progress=False)
    assert summary.written == 3 and summary.skipped == {}


# ------------------------------------------------------------------------------------------------------------------
# DICOMs with known pixels


def test_12bit_window_matches_the_standard_formula(tmp_path: Path) -> None:
    stored = ramp_12bit()
    garbage = stored | np.uint16(0xA000)  # unused high bits of 12-in-16-bit storage must be ignored
    center, width = 1000.0, 500.0
    path = write_dicom(tmp_path / "w.dcm", garbage, window=(center, width))
    image = read_dicom(path)
    expected = np.array([[linear_window(float(v), center, width, 0.0, 4095.0) for v in row] for row in stored.tolist()])
    assert image.voi == "window" and image.value_range == (0.0, 4095.0)
    np.testing.assert_allclose(image.pixels, expected, rtol=0, atol=1e-3)


def test_12bit_window_end_to_end_16bit_png(tmp_path: Path) -> None:
    stored = ramp_12bit()
    center, width = 2000.0, 3001.0
    path = write_dicom(tmp_path / "w.dcm", stored, window=(center, width))
    inputs = InputSet([SourceItem("w.dcm", path)], kind="list")
    options = PreprocessOptions(size=0, bit_depth=16)
    build_shards(inputs, out_dir=tmp_path / "out", salt="saltsalt", options=options, progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        decoded = np.asarray(Image.open(tar.extractfile(png)))
    windowed = np.array([[linear_window(float(v), center, width, 0.0, 4095.0) for v in row] for row in stored.tolist()])
    expected = np.rint((windowed - windowed.min()) / (windowed.max() - windowed.min()) * 65535)
    assert decoded.dtype == np.uint16
    np.testing.assert_allclose(decoded, expected, atol=1)
    assert len(np.unique(decoded)) > 256


@pytest.mark.parametrize("window", [None, (1500.0, 5000.0)])
def test_monochrome1_is_inverted_after_voi_against_2_pow_bits_stored(tmp_path: Path, window) -> None:
    # Values 100..2999 reach neither end of the 12-bit range (nor of the window's output): inverting against the
    # image's own min/max would give a different result than the theoretical 2**12 - 1.
    stored = (100 + ramp_12bit() % 2900).astype(np.uint16)
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", stored, window=window))
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", stored, window=window, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1.pixels, (2**12 - 1) - m2.pixels, atol=1e-3)
    assert m1.value_range == m2.value_range == (0.0, 4095.0)


def test_monochrome1_and_inverted_monochrome2_give_identical_shards(tmp_path: Path) -> None:
    stored = ramp_12bit()
    m1 = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")
    m2 = write_dicom(tmp_path / "m2.dcm", (4095 - stored).astype(np.uint16), photometric="MONOCHROME2")
    pngs = []
    for path in (m1, m2):
        out = tmp_path / f"out-{path.stem}"
        build_shards(
            InputSet([SourceItem("x", path)], kind="list"),
            out_dir=out,
            salt="saltsalt",
            options=PreprocessOptions(size=48),
            progress=False,
        )
        with tarfile.open(out / "shard-000000.tar") as tar:
            pngs.append(next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")))
    assert pngs[0] == pngs[1]


def test_signed_pixels_with_rescale_and_garbage_high_bits(tmp_path: Path) -> None:
    values = np.arange(-2048, 2048, dtype=np.int64).reshape(64, 64)
    words = (values & 0x0FFF) | 0x5000  # two's complement in the low 12 bits, junk above
    path = write_dicom(tmp_path / "s.dcm", words.astype(np.uint16), signed=True, rescale=(2.0, -100.0))
    image = read_dicom(path)
    np.testing.assert_array_equal(image.pixels, values * 2.0 - 100.0)
    assert image.value_range == (-2048 * 2.0 - 100.0, 2047 * 2.0 - 100.0)


@pytest.mark.parametrize("vr,depth", [("US", 8), ("OW", 16)])
def test_voi_lut_sequence_and_monochrome1(tmp_path: Path, vr: str, depth: int) -> None:
    stored = ramp_12bit()
    first, entries = 100, 3000
    # An arbitrary non-monotonic LUT with more entries than 2**depth values (indices must not wrap).
    lut = ((np.arange(entries) * 7919) % 2**depth).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries, first, depth]
    # LUT Data's VR is ambiguous (US or OW); both encodings occur in practice.
    item.add_new(0x00283006, vr, lut.tolist() if vr == "US" else lut.astype("<u2").tobytes())
    extra = {"VOILUTSequence": Sequence([item])}
    expected = np.array([[float(lut[min(max(v - first, 0), entries - 1)]) for v in row] for row in stored.tolist()])
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", stored, extra=extra, window=(50.0, 10.0)))
    assert m2.voi == "lut"  # the LUT wins over the window with voi="auto"
    assert m2.value_range == (0.0, 2.0**depth - 1)
    np.testing.assert_array_equal(m2.pixels, expected)
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", stored, extra=extra, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1.pixels, (2.0**depth - 1) - expected)
    windowed = read_dicom(tmp_path / "m2.dcm", DicomReadOptions(voi="window"))
    assert windowed.voi == "window"
    none = read_dicom(tmp_path / "m2.dcm", DicomReadOptions(voi="none"))
    np.testing.assert_array_equal(none.pixels, stored.astype(np.float32))


def test_burned_in_annotation_is_skipped_unless_kept(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "b.dcm", ramp_12bit(), extra={"BurnedInAnnotation": "YES"})
    with pytest.raises(UnusableImage) as info:
        read_dicom(path)
    assert info.value.reason is SkipReason.BURNED_IN_ANNOTATION
    assert read_dicom(path, DicomReadOptions(skip_burned_in=False)).pixels.shape == (64, 64)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_allowed_fields_are_validated_and_ages_aggregated() -> None:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "12345"
    ds.PatientAge = "093Y"
    ds.PatientSex = "F"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "Chest of J. Doe"  # free text in a code string field: dropped
    ds.PixelSpacing = [0.14, 0.14]
    fields = allowed_fields(ds)
    assert fields == {"ViewPosition": "PA", "PixelSpacing": [0.14, 0.14], "PatientSex": "F", "PatientAge": "090Y+"}


PLANTED = {
    "PatientName": "Planted^Jane^Q",
    "PatientID": "PID-PLANTED-7731",
    "StudyDate": "19990102",
    "PatientBirthDate": "19420315",
    "AccessionNumber": "ACC-PLANTED-55",
    "InstitutionName": "Planted General Hospital",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.424242",
    "ReferringPhysicianName": "Dr^Plantedref",
}


def test_planted_phi_never_reaches_shards_or_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    extra = dict(PLANTED, PatientAge="045Y", PatientSex="F", ViewPosition="PA", BodyPartExamined="CHEST")
    # The file name carries PHI too, as hospital exports often do.
    write_dicom(src / "Planted_Jane_PID-PLANTED-7731_19990102.dcm", ramp_12bit(), window=(2048.0, 4096.0), extra=extra)
    write_dicom(src / "ct.dcm", ramp_12bit(), modality="CT", extra=extra)
    out = tmp_path / "out"
    summary = build_shards(
        InputSet([SourceItem(p.name, p) for p in sorted(src.iterdir())], kind="directory"),
        out_dir=out,
        salt="saltsalt",
        options=PreprocessOptions(size=32),
        progress=False,
    )
    assert summary.written == 1 and summary.skipped == {"modality": 1}
    needles = [*PLANTED.values(), "Planted", "PLANTED", "7731", "19990102", "424242", "Plantedref"]
    for path in out.iterdir():
        data = path.read_bytes().lower()
        for needle in needles:
            assert needle.lower().encode() not in data, f"{needle!r} found in {path.name}"
    # The key map (kept apart from the shards) is where the source name goes.
    assert b"PID-PLANTED-7731" in summary.key_map_path.read_bytes()
    assert summary.key_map_path.parent != out
    with tarfile.open(out / "shard-000000.tar") as tar:
        record = json.loads(next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json")))
    assert record["dicom"] == {
        "Modality": "DX",
        "ViewPosition": "PA",
        "BodyPartExamined": "CHEST",
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsStored": 12,
        "Rows": 64,
        "Columns": 64,
        "PatientSex": "F",
        "PatientAge": "045Y",
    }


def test_builder_on_a_dicom_tree_counts_every_reason(tmp_path: Path) -> None:
    """Hospital-style export: extensionless and UID-named files, mixed modalities and damaged files."""
    src = tmp_path / "export" / "series1"
    src.mkdir(parents=True)
    mr = _testfile("MR_small.dcm").read_bytes()
    (src / "IM0001").write_bytes(mr)  # no extension: found by the walk, sniffed as DICOM
    (src / "1.2.840.113619.2.55.3.1234").write_bytes(_testfile("MR_small_RLE.dcm").read_bytes())
    (src / "truncated.dcm").write_bytes(_testfile("MR_truncated.dcm").read_bytes())
    pixel_offset = pydicom.dcmread(_testfile("MR_small.dcm"))["PixelData"].file_tell
    (src / "header-cut.dcm").write_bytes(mr[: pixel_offset - 20])  # cut inside the header, after Rows/Columns
    (src / "ct.dcm").write_bytes(_testfile("CT_small.dcm").read_bytes())
    (src / "plan.dcm").write_bytes(_testfile("rtplan.dcm").read_bytes())
    (src / "cine.dcm").write_bytes(_testfile("SC_rgb_rle_2frame.dcm").read_bytes())
    (src / "random.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    (src / "empty.dcm").write_bytes(b"")
    write_dicom(src / "burned.dcm", ramp_12bit(), extra={"BurnedInAnnotation": "YES"})
    write_dicom(src / "dx.dcm", ramp_12bit(), window=(2000.0, 3000.0))
    (src / "notes.txt").write_text("ignored: not an image by name")
    from raddino.data.shard_inputs import collect_inputs

    inputs = collect_inputs(tmp_path / "export")
    assert inputs.ignored_files == 1 and len(inputs.items) == 11
    options = PreprocessOptions(size=32, dicom=DicomReadOptions(modalities=("DX", "MR", "OT")))
    summary = build_shards(inputs, out_dir=tmp_path / "out", salt="saltsalt", options=options, progress=False)
    assert summary.written == 3  # IM0001, the RLE one and dx.dcm
    assert summary.skipped == {
        "burned_in_annotation": 1,
        "empty": 1,
        "modality": 1,
        "multi_frame": 1,
        "no_pixel_data": 1,
        "truncated": 2,
        "unsupported_format": 1,
    }
