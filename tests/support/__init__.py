"""What the tests, the compose scenario and the benchmarks share, one module per concept:

- `images`: images made on the fly (flat, noisy, labelled sets, every mode, a declared size);
- `waiting`: free ports and polling (`wait_for`, `wait_ready`);
- `service`: the whole service started with `serve.run` on a free loopback port;
- `http`: assertions on answers (the error shape);
- `load`: clients predicting in a loop while something else happens;
- `processes`: this test's own Serve processes and their memory;
- `dataset`: the dataset store's files and ledger checked on disk;
- `hostile`: uploads and pickles meant to do harm.

Fixtures (the Ray cluster) live in `tests/conftest.py`; nothing here is a fixture.
"""
