"""Feature definitions, the offline store over Parquet, point-in-time joins, validation.

Imports nothing else of this project (DESIGN.md, dependency direction).
"""

from feature_store.definitions import Entity, Events, Feature, FeatureSet, parse_duration
from feature_store.pit import join_features, point_in_time_join
from feature_store.store import OfflineStore
from feature_store.validate import DataError, validate_events

__all__ = [
    "DataError",
    "Entity",
    "Events",
    "Feature",
    "FeatureSet",
    "OfflineStore",
    "join_features",
    "parse_duration",
    "point_in_time_join",
    "validate_events",
]
