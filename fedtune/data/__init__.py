"""Site data: loading, encoding, partitioning, and the built-in demo corpus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from fedtune.config import DataConfig
from fedtune.data.partition import partition, train_eval_split
from fedtune.data.records import DataError, Record, RecordSchema, read_jsonl_objects


@dataclass
class FederatedData:
    """The pooled records of a simulation, split into sites and a held-out set."""

    records: list[Record]
    site_indices: list[list[int]]
    eval_indices: list[int]

    def site_records(self, site: int) -> list[Record]:
        return [self.records[i] for i in self.site_indices[site]]

    def eval_records(self) -> list[Record]:
        return [self.records[i] for i in self.eval_indices]

    @property
    def num_train_records(self) -> int:
        return sum(len(s) for s in self.site_indices)


def load_jsonl(path: str | Path, fmt: str = "auto", group_field: Optional[str] = None,
               label_field: str = "label", label_names: Optional[Sequence[str]] = None) -> list[Record]:
    """Read every record of a JSONL file; raise DataError on the first malformed line.

    Each object becomes a record by the task that reads ``fmt`` (``Task.parse_record``), so
    a new task's record format needs no change here.
    """
    from fedtune.tasks import task_for_format  # the tasks build on fedtune.data.records

    schema = RecordSchema(fmt, group_field, label_field, label_names)
    task = task_for_format(fmt)
    path = Path(path)
    records = [task.parse_record(obj, schema, where) for where, obj in read_jsonl_objects(path)]
    if not records:
        raise DataError(f"{path}: no records. Give a JSONL file with one JSON object per line.")
    return records


def load_records(cfg: DataConfig) -> list[Record]:
    if cfg.path is None:
        from fedtune.tasks import task_for_format  # the tasks build on fedtune.data.records

        return task_for_format(cfg.format).demo_records(cfg)
    return load_jsonl(cfg.path, fmt=cfg.format, group_field=cfg.group_field, label_field=cfg.label_field,
                      label_names=cfg.label_names)


def split_records(cfg: DataConfig) -> tuple[list[Record], list[int], list[int]]:
    """Every record, and the indices of the training pool and of the held-out set."""
    records = load_records(cfg)
    train_idx, eval_idx = train_eval_split(len(records), cfg.eval_fraction, cfg.seed)
    return records, train_idx, eval_idx


def load_federated_data(cfg: DataConfig, num_sites: Optional[int]) -> FederatedData:
    """Deterministic in the config: every simulated party computes the same split.

    ``num_sites`` None: as many sites as data.partition=by_field makes of the data.
    """
    records, train_idx, eval_idx = split_records(cfg)
    train_records = [records[i] for i in train_idx]
    parts = (partition(train_records, num_sites, cfg.partition, cfg.dirichlet_alpha, cfg.seed,
                       cfg.min_records_per_site) if train_records else [[] for _ in range(num_sites or 0)])
    site_indices = [[train_idx[j] for j in part] for part in parts]
    if cfg.canary_path is not None:
        # Audit canaries join one site's training data only (never the held-out set).
        canaries = load_jsonl(cfg.canary_path, fmt=cfg.format, group_field=cfg.group_field,
                              label_field=cfg.label_field, label_names=cfg.label_names)
        site_indices[cfg.canary_site].extend(range(len(records), len(records) + len(canaries)))
        records = records + canaries
    return FederatedData(records=records, site_indices=site_indices, eval_indices=eval_idx)


__all__ = ["DataError", "FederatedData", "Record", "load_federated_data", "load_jsonl", "load_records",
           "split_records"]
