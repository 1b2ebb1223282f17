"""Data-free methods that optimise the merged task vector per matrix against the task vectors' interference:
WUDI and DOGE-TA, with the Adam steps (``_adam``) they share."""
