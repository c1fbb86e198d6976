"""The study store: a folder of hive-partitioned Parquet tables plus ``study.json``.

``tables`` is the contract (every column of every table), ``shards`` the generic atomic
shard store, ``codecs`` the weights and feature-matrix encodings, ``study`` the store bound
to one study (:class:`Store`). From Python: ``Store(path).scan("tests").collect()``.
"""

from distsim.errors import StoreError
from distsim.store.codecs import FeatureMatrix
from distsim.store.study import Store
from distsim.store.tables import STATUSES, TABLES, TableSpec, model_id

__all__ = ["STATUSES", "TABLES", "FeatureMatrix", "Store", "StoreError", "TableSpec", "model_id"]
