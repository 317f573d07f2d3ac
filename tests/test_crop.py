"""--crop head: the head's box on closed-form phantoms, and the readers cutting to it."""
import numpy as np
import pytest

from factories import make_ct, make_series
from utils.crop import HEAD_HU, MARGIN, crop_square, head_box
from utils.data import SliceDataset
from utils.dicom import read_hu, read_windowed, read_windowed_box, windowed_hu

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def _ellipse(shape=(512, 512), centre=(250, 230), axes=(150, 120)) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return ((rows - centre[0]) / axes[0]) ** 2 + ((cols - centre[1]) / axes[1]) ** 2 <= 1


def test_the_box_of_an_ellipse_is_its_longer_axis_with_the_margin_about_its_centre():
    mask = _ellipse()
    mask[470:476, 60:460] = True  # the table: a thin region of its own, smaller than the head
    top, left, side = head_box(mask)
    assert abs(side - 300 * (1 + 2 * MARGIN)) <= 10  # 2 x 150 rows, the longer axis
    assert abs(top + side / 2 - 250) <= 4 and abs(left + side / 2 - 230) <= 4


def test_at_the_vertex_a_head_holder_larger_than_the_skulls_cap_is_not_taken_for_the_head():
    mask = _ellipse(centre=(200, 256), axes=(40, 50))  # the cap: 6,300 pixels
    holder = _ellipse(centre=(230, 256), axes=(200, 220)) & ~_ellipse(centre=(230, 256), axes=(185, 205))
    mask |= holder & (np.ogrid[:512, :512][0] > 230)  # a U below and around it: 8,000 pixels
    assert holder[230:].sum() > _ellipse(axes=(40, 50)).sum()
    top, left, side = head_box(mask)
    assert abs(side - 100 * (1 + 2 * MARGIN)) <= 10 and abs(top + side / 2 - 200) <= 4


def test_an_empty_slice_or_a_speck_has_no_box_and_is_kept_whole():
    img = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    assert head_box(np.zeros((512, 512), bool)) is None
    speck = np.zeros((512, 512), bool)
    speck[100:104, 100:104] = True
    assert head_box(speck) is None
    assert crop_square(img, None) is img


def test_a_head_touching_the_border_is_padded_with_air_not_shifted():
    mask = _ellipse(centre=(256, 60), axes=(150, 120))  # cut off by the left edge
    top, left, side = box = head_box(mask)
    assert left < 0 and abs(left + side / 2 - 90) <= 4  # centred on the visible part: columns 0 to 180
    assert 0 <= top and top + side <= 512
    img = np.random.default_rng(0).integers(1, 255, (512, 512, 3)).astype(np.uint8)
    out = crop_square(img, box)
    assert out.shape == (side, side, 3)
    assert (out[:, :-left] == 0).all()  # outside the image: air
    np.testing.assert_array_equal(out[:, -left:], img[top:top + side, :side + left])  # inside: unmoved


def test_the_readers_cut_the_slice_to_the_box_of_its_hu_then_resize(tmp_path):
    hu = np.where(_ellipse(), 40, -1000).astype(np.int16)
    hu[470:476, 60:460] = 300  # a table
    path = make_ct(tmp_path / "head.dcm", hu + 1024, intercept="-1024")
    box = head_box(read_hu(path) > HEAD_HU)
    img, got = read_windowed_box(path, size=64, crop="head")
    assert got == box
    whole = read_windowed(path)
    expected = read_windowed(path, size=64, crop=box)
    np.testing.assert_array_equal(img, expected)
    assert not np.array_equal(img, read_windowed(path, size=64))  # the crop changed the image
    np.testing.assert_array_equal(crop_square(whole, box)[10:20, 150:160], whole[box[0] + 10:box[0] + 20,
                                                                                box[1] + 150:box[1] + 160])
    from_hu, hu_box = windowed_hu(path, read_hu(path), size=64, crop="head")  # NIfTI's path: the same box
    assert hu_box == box
    np.testing.assert_array_equal(from_hu, img)


def test_neighbours_are_cut_to_the_middle_slices_box(tmp_path):
    paths = make_series(tmp_path, [(0, 0, z) for z in (0, 5, 10)], (1, 0, 0, 0, 1, 0))
    for path, axes in zip(paths, [(40, 30), (150, 120), (60, 50)]):  # heads of other sizes
        make_ct(path, np.where(_ellipse(axes=axes), 1064, 24), intercept="-1024", Modality="CT")
    ds = SliceDataset([paths[1]], windows=((40, 80),), size=32, neighbours=[(paths[0], paths[2])], crop="head")
    image = ds[0][0].numpy()
    box = read_windowed_box(paths[1], size=32, crop="head")[1]
    np.testing.assert_array_equal(image[0], read_windowed(paths[0], ((40, 80),), 32, crop=box)[..., 0])
    np.testing.assert_array_equal(image[2], read_windowed(paths[2], ((40, 80),), 32, crop=box)[..., 0])
    assert not np.array_equal(image[0], read_windowed(paths[0], ((40, 80),), 32, crop="head")[..., 0])
