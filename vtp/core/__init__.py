"""The kernel every stage may use: settings, region and topic names, header names, metrics
declarations, the warehouse driver, the registry reader, Kafka retries and keys.

It imports nothing from a stage (``producers``, ``stream_jobs``, ``sinks``, ``owner_api``)
or from the application (``vtp.cli``, ``vtp.demo``, ``vtp.harness``, ``deploy``); the
import contract (``python -m vtp.layers``) keeps it so.
"""
