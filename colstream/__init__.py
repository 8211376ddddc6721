"""colstream: documents in, ColPali-family multivectors in Qdrant, through Kafka."""

__version__ = "0.1.0"
