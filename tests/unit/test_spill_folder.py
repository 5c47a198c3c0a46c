"""Where the tiled VAE may spill: the filesystem under a folder, read from /proc/mounts text (needs torch)."""
import pytest

pytest.importorskip("torch", reason="tiled_vae is torch code; run with the ComfyUI host venv's python")

from comfyui_astria.nodes.core.tiled_vae import RAM_FILESYSTEMS, mount_type

MOUNTS = """proc /proc proc rw,relatime 0 0
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,relatime,size=24683652k 0 0
/dev/vdb /data xfs rw 0 0
tmpfs /data/ram tmpfs rw 0 0
/dev/vdc /mnt/my\\040disk ext4 rw 0 0
overlay /dev/shm overlay rw 0 0
"""


@pytest.mark.parametrize(("path", "expected"), [
    ("/", "ext4"),
    ("/tmp/comfy/temp", "ext4"),
    ("/data/outputs", "xfs"),
    ("/data/ram/spill", "tmpfs"),
    ("/data/ramdisk", "xfs"),  # a sibling whose name starts like the tmpfs mount point is not inside it
    ("/mnt/my disk/spill", "ext4"),  # /proc/mounts writes a space as \040
    ("/dev/shm/x", "overlay"),  # two mounts on one point: the later one is in force
])
def test_the_longest_mount_point_holding_the_path_gives_its_filesystem(path, expected):
    assert mount_type(path, MOUNTS) == expected


def test_ram_filesystems_are_the_ones_a_spill_file_would_not_relieve():
    assert mount_type("/data/ram/spill", MOUNTS) in RAM_FILESYSTEMS
    assert mount_type("/data/outputs", MOUNTS) not in RAM_FILESYSTEMS
    assert mount_type("/x", "garbage\n") is None
