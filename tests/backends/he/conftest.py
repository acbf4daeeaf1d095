"""HE backend tests run SEAL through tenseal, which ``pip install -e ".[all]"`` installs.

They are never skipped: without tenseal they fail with the backend's own one-line error
("he: tenseal is not installed ..."), so a green run proves the HE backend ran.
"""
