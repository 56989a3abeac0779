"""A local Hugging Face cache laid out as huggingface_hub writes it (``hub/<type>s--org--name/`` with
``refs/main``, ``blobs/`` and ``snapshots/<commit>/`` of links to the blobs), for the offline paths:
nothing here can be downloaded, so the tests fill the cache themselves."""
import hashlib
import os
import shutil


def add_repo(hf_home: str, repo_id: str, source_dir: str, repo_type: str = "model", skip: tuple = ()) -> str:
    """Put every file of ``source_dir`` (except the names in ``skip``) into the cache of ``hf_home`` as
    ``repo_id``'s main revision; returns the snapshot directory."""
    repo = os.path.join(hf_home, "hub", f"{repo_type}s--{repo_id.replace('/', '--')}")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    for root, _, files in os.walk(source_dir):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), source_dir)
            if relative in skip:
                continue
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            if not os.path.exists(blob):
                shutil.copyfile(os.path.join(root, name), blob)
            link = os.path.join(snapshot, relative)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return snapshot
