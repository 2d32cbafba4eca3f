"""How many sites a simulation has when the data decides: ``data.partition=by_field``.

A LEAF-style federation has one site per speaker (writer, user) with enough records, a
number the researcher should not have to count by hand.  ``federation.num_sites=null``
asks for it: :func:`resolve_num_sites` counts them in the data before anything is built,
and writes the count into the config, so every consumer (the validation, the secure
aggregation parameters, Flower's or the in-process engine, the reports and the resolved
``config.yaml``) sees one plain number.
"""

from __future__ import annotations

import logging

from fedtune.config import DataConfig, FedtuneConfig, validate_data, validate_num_sites_source
from fedtune.data import split_records
from fedtune.data.partition import partition
from fedtune.errors import ConfigError, require

log = logging.getLogger(__name__)


def count_field_sites(cfg: DataConfig) -> int:
    """The sites ``by_field`` makes of this data: its group values with at least min_records_per_site records.

    The same split and grouping every party computes (:func:`fedtune.data.load_federated_data`),
    so the count is the number of partitions the sites will find.
    """
    records, train_idx, _ = split_records(cfg)
    train = [records[i] for i in train_idx]
    return len(partition(train, None, cfg.partition, cfg.dirichlet_alpha, cfg.seed, cfg.min_records_per_site))


def resolve_num_sites(cfg: FedtuneConfig) -> None:
    """Fill in a null ``federation.num_sites`` from the data (by_field only), or check a number against it.

    Idempotent: an entry point may call it and hand the config on to another that calls
    it again.  With by_field an explicit number the data does not make is refused here,
    before anything is printed or started, naming the number it makes.
    """
    f, d = cfg.federation, cfg.data
    validate_num_sites_source(f.num_sites, d)
    if d.partition != "by_field":
        return
    validate_data(d, None)  # the file exists and by_field names its field, before it is read
    count = count_field_sites(d)
    if count == 0:
        raise ConfigError("data.min_records_per_site",
                          f"no data.group_field={d.group_field} value has {d.min_records_per_site} or more training "
                          "records, so data.partition=by_field makes no site",
                          "Lower data.min_records_per_site, or check data.group_field names the records' owner.")
    if f.num_sites is not None:
        require(f.num_sites == count, "federation.num_sites",
                f"data.partition=by_field makes one site per distinct data.group_field={d.group_field} value with "
                f"at least data.min_records_per_site={d.min_records_per_site} training records: this data has "
                f"{count}, not {f.num_sites}",
                f"Set federation.num_sites={count} or null (the number the data makes), or change "
                "data.min_records_per_site.")
        return
    f.num_sites = count
    log.info("federation.num_sites=%d: one site per data.group_field=%s value with >= %d training records",
             count, d.group_field, d.min_records_per_site)
