"""The reliability suite (issue #10): fault scenarios on loopback, each reporting what it lost.

``python -m tests.reliability.run`` (``make reliability``) runs the full forms and prints a table;
``tests/reliability/test_reliability.py`` runs the short forms under pytest.
"""
