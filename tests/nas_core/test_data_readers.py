"""Readers against the real files in ../shared/data (skipped where absent) and bad-input cases."""

import warnings

import numpy as np
import pytest
import tifffile

from nas_core.data.readers import (DataError, class_id, detect_layout, list_samples, mask_to_label,
                                   parse_aperio_xml, patient_of, read_image_file)

# counted once from the XML (grep of <Region> per file and per annotation) and checked against the reader
MONUSAC_NUCLEI = {  # id suffix -> nuclei per class 1..4
    "_1": [314, 0, 0, 7], "_2": [15, 299, 0, 0], "_3": [0, 0, 5, 0]}
MONUSAC_PIXELS = {"_1": [301679, 0, 0, 86493], "_2": [11496, 122362, 0, 0], "_3": [0, 0, 2617, 0]}
MONUSEG_NUCLEI = {"TCGA-2Z-A9J9-01A-01-TS1": 575, "TCGA-69-7764-01A-01-TS1": 441, "TCGA-A6-6782-01A-01-BS1": 441,
                  "TCGA-AC-A2FO-01A-01-TS1": 521, "TCGA-CU-A0YN-01A-02-BSB": 677, "TCGA-EJ-A46H-01A-03-TSC": 466,
                  "TCGA-HT-8564-01Z-00-DX1": 249}
# class pixels after nearest-palette snapping of the JPEG masks (ids without the "TCGA-" prefix)
TEST_MASK_PIXELS = {
    "2Z-A9JG-01Z-00-DX1_1": [0, 0, 3229, 0],
    "2Z-A9JG-01Z-00-DX1_2": [0, 0, 1096, 0],
    "2Z-A9JG-01Z-00-DX1_3": [0, 0, 5210, 0],
    "2Z-A9JG-01Z-00-DX1_4": [119595, 0, 0, 0],
    "2Z-A9JG-01Z-00-DX1_5": [0, 147257, 0, 0],
    "2Z-A9JG-01Z-00-DX1_6": [34411, 1517, 959, 72784],
    "2Z-A9JN-01Z-00-DX1_1": [0, 60389, 0, 0],
    "2Z-A9JN-01Z-00-DX1_2": [239538, 0, 0, 0],
    "2Z-A9JN-01Z-00-DX1_3": [0, 0, 2994, 0],
    "2Z-A9JN-01Z-00-DX1_4": [0, 0, 0, 23659],
    "50-6591-01Z-00-DX1_001": [267533, 0, 0, 0],
    "55-7570-01Z-00-DX1_001": [0, 79448, 0, 0],
    "55-7570-01Z-00-DX1_002": [0, 0, 0, 17215],
    "73-4662-01Z-00-DX1_001": [0, 112128, 0, 0],
    "73-4662-01Z-00-DX1_002": [0, 0, 3322, 0],
    "73-4662-01Z-00-DX1_003": [271673, 10495, 0, 0],
    "78-7152-01Z-00-DX1_001": [0, 1913, 2850, 0],
    "78-7152-01Z-00-DX1_002": [0, 0, 0, 9390],
    "A2-A0ES-01Z-00-DX1_001": [0, 117231, 0, 0],
    "A2-A0ES-01Z-00-DX1_002": [165752, 0, 0, 0],
    "DW-7838-01Z-00-DX1_1": [0, 149061, 0, 0],
    "DW-7838-01Z-00-DX1_2": [83769, 5010, 0, 0],
    "DW-7838-01Z-00-DX1_3": [0, 0, 0, 7948],
    "DW-7838-01Z-00-DX1_4": [0, 0, 1524, 0],
    "DW-7838-01Z-00-DX1_5": [0, 0, 2285, 0],
    "F9-A8NY-01Z-00-DX1_1": [636190, 9976, 0, 0],
    "F9-A8NY-01Z-00-DX1_2": [0, 0, 0, 29288],
    "F9-A8NY-01Z-00-DX1_3": [4448, 63570, 0, 0],
    "F9-A8NY-01Z-00-DX1_4": [0, 0, 0, 4674],
    "G9-6356-01Z-00-DX1_1": [168677, 9404, 0, 0],
    "G9-6356-01Z-00-DX1_3": [0, 41924, 0, 0],
    "G9-6356-01Z-00-DX1_4": [0, 35488, 0, 0],
    "G9-6356-01Z-00-DX1_5": [0, 1164, 3735, 0],
    "G9-6356-01Z-00-DX1_6": [8147, 0, 0, 23216],
    "IZ-A6M9-01Z-00-DX1_1": [68881, 2117, 0, 0],
    "IZ-A6M9-01Z-00-DX1_2": [273558, 4786, 0, 0],
    "IZ-A6M9-01Z-00-DX1_3": [5774, 564, 0, 88564],
    "MP-A4T7-01Z-00-DX1_001": [0, 0, 1534, 0],
    "MP-A4T7-01Z-00-DX1_002": [3500, 0, 0, 44952],
    "MP-A4T7-01Z-00-DX1_003": [0, 55569, 0, 0],
}


def _load_all(root, **kw):
    layout, refs = list_samples(root, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layout, [r.load() for r in refs]


@pytest.mark.real_data
def test_monusac_svs_and_tif_agree_and_counts(shared_data):
    root = shared_data / "monusac"
    layout, svs = _load_all(root)
    assert layout == "monusac" and len(svs) == 3
    _, tif = _load_all(root, layout="monusac", prefer="tif")
    for a, b in zip(svs, tif):
        assert a.image.shape == b.image.shape and np.array_equal(a.image, b.image)
        assert a.patient == "TCGA-5P-A9K0-01Z-00-DX1" and a.mpp == pytest.approx(0.19448)
        suffix = a.id[-2:]
        assert [a.nuclei[c] for c in range(1, 5)] == MONUSAC_NUCLEI[suffix]
        assert np.bincount(a.label.ravel(), minlength=5)[1:].tolist() == MONUSAC_PIXELS[suffix]
        assert a.instances.max() == sum(MONUSAC_NUCLEI[suffix]) and a.instances.dtype == np.int32
        assert not a.ignore.any()
    # the raw .tif really is B,G,R,A: unflipped it disagrees with the .svs
    raw = tifffile.imread(next(root.rglob("*_1.tif")))
    assert raw.shape[2] == 4 and not np.array_equal(raw[..., :3], svs[0].image)


@pytest.mark.real_data
def test_monuseg_binary(shared_data):
    layout, samples = _load_all(shared_data / "monuseg")
    assert layout == "monuseg"
    assert {s.id: s.nuclei[1] for s in samples} == MONUSEG_NUCLEI
    for s in samples:
        assert s.image.shape == (1000, 1000, 3) and set(np.unique(s.label)) == {0, 1}
        assert sum(s.nuclei[c] for c in (2, 3, 4)) == 0


@pytest.mark.real_data
def test_monusac_test_masks_folder(shared_data):
    root = shared_data / "monusac_test_masks"
    layout, samples = _load_all(root)
    assert layout == "folder" and len(samples) == 40
    got = {s.id[5:]: np.bincount(s.label.ravel(), minlength=5)[1:].tolist() for s in samples}
    assert got == TEST_MASK_PIXELS
    # the images are stored R/B swapped: auto must flip them, like an explicit "bgr"
    _, refs = list_samples(root, channel_order="bgr")
    explicit = refs[0].load().image
    assert np.array_equal(explicit, samples[0].image)
    assert np.array_equal(read_image_file(refs[0].files[0])[..., ::-1], explicit)


def test_class_names_normalised():
    assert class_id(" Macrophages ") == 4 and class_id("EPITHELIAL") == 1 and class_id("lymphocytes") == 2
    assert class_id("neutrophil") == 3 and class_id("Ambiguous") == -1 and class_id("Description") is None
    assert patient_of("P_1") == patient_of("P_001") == patient_of("P-3") == "P"


XML_HEAD = '<Annotations MicronsPerPixel="0.25"><Annotation Id="1" Name=""><Attributes>'


def _xml(tmp_path, name, body):
    p = tmp_path / "x.xml"
    p.write_text(XML_HEAD + f'<Attribute Name="{name}" Id="0" Value=""/></Attributes><Regions>{body}'
                 "</Regions></Annotation></Annotations>")
    return p


def _region(pts):
    return '<Region Id="1"><Vertices>' + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in pts) + "</Vertices></Region>"


def test_polygon_fill_rows_are_y(tmp_path):
    p = _xml(tmp_path, "Macrophages", _region([(2, 1), (6, 1), (6, 3), (2, 3)]))
    label, inst, ign, mpp, nuclei, notes = parse_aperio_xml(p, (8, 10))
    assert nuclei[4] == 1 and mpp == 0.25 and not notes
    ys, xs = np.nonzero(label == 4)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (1, 3, 2, 6)


def test_ambiguous_goes_to_ignore(tmp_path):
    p = _xml(tmp_path, "Ambiguous", _region([(0, 0), (4, 0), (4, 4)]))
    label, _, ign, *_ = parse_aperio_xml(p, (8, 8))
    assert ign.sum() > 0 and label.max() == 0


def test_unknown_class_rejected_naming_file_and_name(tmp_path):
    p = _xml(tmp_path, "Fibroblast", _region([(0, 0), (4, 0), (4, 4)]))
    with pytest.raises(DataError, match=r"x\.xml.*'Fibroblast'"):
        parse_aperio_xml(p, (8, 8))
    # a non-class name without regions is only a warning
    p = _xml(tmp_path, "Description", "")
    *_, notes = parse_aperio_xml(p, (8, 8))
    assert "Description" in notes[0]


def test_polygon_outside_clipped_or_dropped(tmp_path):
    p = _xml(tmp_path, "Epithelial", _region([(-10, 2), (5, 2), (5, 6), (-10, 6)]) + _region([(50, 50), (60, 50), (60, 60)]))
    label, _, _, _, nuclei, notes = parse_aperio_xml(p, (8, 8))
    assert nuclei[1] == 1 and label[2:7, 0:6].all()
    assert any("clipped" in n for n in notes) and any("outside" in n and "dropped" in n for n in notes)


def test_malformed_xml(tmp_path):
    p = tmp_path / "bad.xml"
    p.write_text("<Annotations><Annotation>")
    with pytest.raises(DataError, match="bad.xml.*malformed XML"):
        parse_aperio_xml(p, (4, 4))


def test_truncated_image(tmp_path):
    d = tmp_path / "P1"
    d.mkdir()
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    tifffile.imwrite(d / "P1_1.tif", img, photometric="rgb", compression="zlib")
    data = (d / "P1_1.tif").read_bytes()
    (d / "P1_1.tif").write_bytes(data[: len(data) // 2])
    _xml(tmp_path, "Epithelial", "").rename(d / "P1_1.xml")
    layout, refs = list_samples(tmp_path)
    with pytest.raises(DataError, match="P1_1.tif"):
        refs[0].load()


def test_mask_size_mismatch_and_bad_index(tmp_path):
    import cv2
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((10, 12, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.zeros((10, 11), np.uint8))
    _, refs = list_samples(tmp_path, channel_order="rgb")
    with pytest.raises(DataError, match=r"a\.png.*11x10.*12x10"):
        refs[0].load()
    with pytest.raises(DataError, match="value 7"):
        mask_to_label(np.full((3, 3), 7, np.uint8), tmp_path / "m.png")


def test_colour_mask_snaps_jpeg_noise():
    m = np.zeros((2, 3, 3), np.uint8)
    m[0, 0] = (10, 240, 12)   # ~green
    m[0, 1] = (250, 245, 30)  # ~yellow
    m[1, 2] = (20, 5, 230)    # ~blue
    label, _ = mask_to_label(m, None)
    assert label.tolist() == [[1, 2, 0], [0, 0, 4]]


def test_empty_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="empty"):
        detect_layout(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown dataset layout"):
        detect_layout(tmp_path)
