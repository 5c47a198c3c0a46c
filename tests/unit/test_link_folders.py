"""The test link folder (tests/support/paths.py): one stable name per clone, stale folders removed, others kept."""
import hashlib

from comfyui_astria.tests.support import paths


def link_folder(root, name, target):
    folder = root / name
    folder.mkdir()
    (folder / paths.PACK_FOLDER_NAME).symlink_to(target, target_is_directory=True)
    return folder


def test_link_folder_name_is_stable_and_stale_folders_go(tmp_path, monkeypatch):
    root, clone, other_clone = tmp_path / "links", tmp_path / "clone", tmp_path / "other"
    root.mkdir(), clone.mkdir(), other_clone.mkdir()
    monkeypatch.setattr(paths, "LINK_FOLDERS", root)
    monkeypatch.setattr(paths, "PACK_ROOT", clone)
    old_name = link_folder(root, "12345678", clone)  # this clone under an old per-process name
    gone = link_folder(root, "23456789", tmp_path / "deleted-clone")
    others = link_folder(root, "34567890", other_clone)  # another clone's tests may be running
    folder = paths.pack_link_folder()
    assert folder.name == hashlib.sha1(str(clone).encode()).hexdigest()[:16]
    assert paths.pack_link_folder() == folder  # the same in every process of the clone
    assert (folder / paths.PACK_FOLDER_NAME).resolve() == clone
    assert sorted(path.name for path in root.iterdir()) == sorted([folder.name, others.name])
    assert not old_name.exists() and not gone.exists() and clone.is_dir() and other_clone.is_dir()
