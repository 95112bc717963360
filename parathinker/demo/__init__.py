"""A self-contained CPU demonstration that native parallel thinking helps: `python -m parathinker.demo`."""
