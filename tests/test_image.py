"""utils.image: which files are images, and listing them (training folders, alignment, inference, TinyFace)."""
import pytest

from utils.image import IMAGE_EXTENSIONS, is_image_file, list_images


def test_image_endings_are_those_of_torchvision_image_folder():
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    assert is_image_file("a.JPG") and is_image_file("dir/b.jpeg") and is_image_file("c.webp")
    assert not is_image_file("notes.txt") and not is_image_file("clip.mp4") and not is_image_file("jpg")
    assert not is_image_file("._a.jpg") and not is_image_file(".hidden.png")   # macOS / hidden files


def test_list_images_is_recursive_sorted_and_names_a_missing_folder(tmp_path):
    for rel in ("b/2.png", "b/1.JPG", "a.jpg", "a/z/3.tif", "a/readme.txt", "b/._1.JPG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()                                        # a folder, not a file
    # sorted part by part, as pathlib compares paths: folder a/ before the file a.jpg
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == \
        ["a/z/3.tif", "a.jpg", "b/1.JPG", "b/2.png"]
    with pytest.raises(FileNotFoundError, match="image folder not found: .*missing"):
        list_images(tmp_path / "missing")
