"""PyIceberg's catalog as Idem's Iceberg scripts open it: a SqlCatalog on
PostgreSQL (a SQLAlchemy URL), a RestCatalog (an http:// URL) or a
GlueCatalog (glue:ENDPOINT, Glue's API there); the warehouse on the local
disk or, for an s3:// warehouse, on the store at $IDEM_S3_ENDPOINT with
the AWS_* variables."""
import os

from pyiceberg.catalog.glue import GlueCatalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog


def open_catalog(url, name, warehouse, create_tables=False):
    if url.startswith("glue:"):
        props = {
            "glue.endpoint": url[len("glue:"):],
            "glue.region": os.environ.get("AWS_REGION", "us-east-1"),
            "glue.access-key-id": os.environ.get("AWS_ACCESS_KEY_ID", ""),
            "glue.secret-access-key": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        }
        return GlueCatalog(name, **props, **s3_props())
    rest = url.startswith("http")
    props = {"uri": url} if rest else {
        "uri": url, "warehouse": warehouse,
        "init_catalog_tables": "true" if create_tables else "false"}
    props.update(s3_props())
    return RestCatalog(name, **props) if rest else SqlCatalog(name, **props)


def s3_props():
    """The test store's settings, for an s3:// warehouse."""
    if not os.environ.get("IDEM_S3_ENDPOINT"):
        return {}
    return {
        "s3.endpoint": os.environ["IDEM_S3_ENDPOINT"],
        "s3.access-key-id": os.environ.get("AWS_ACCESS_KEY_ID", ""),
        "s3.secret-access-key": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        "s3.region": os.environ.get("AWS_REGION", "us-east-1"),
        "s3.path-style-access": "true",
    }
