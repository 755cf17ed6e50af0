"""Serving the trained models through a MONAI Label server (``medsynth serve``).

* :mod:`medsynth.serving.tasks`: MONAI Label inference tasks around the bundles' own inference
  (synthesis from a lesion mask; lesion segmentation);
* :mod:`medsynth.serving.security`: the request checks the stock server lacks (ids only, no paths);
* :mod:`medsynth.serving.asgi`: MONAI Label's FastAPI application with those checks and clean 4xx
  answers, what ``medsynth serve`` runs;
* :mod:`medsynth.serving.client`: a small client that posts a mask and saves the sequences.

The MONAI Label app itself is ``apps/monailabel/main.py``. Only :mod:`~medsynth.serving.security`
and :mod:`~medsynth.serving.client` import without ``monailabel`` installed.
"""
