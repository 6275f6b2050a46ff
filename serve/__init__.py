"""Online video face recognition as a Ray Serve application (configs/serve.yaml; `python -m serve.deploy`).

config.py   the application's typed settings (the `args` of configs/serve.yaml)
frames.py   an encoded face crop -> the model's uint8 pixels, or a one-line reason it is refused
gallery.py  enrolled identities (QWFA templates), persisted as one JSON file (local path or s3://)
streams.py  per-stream online aggregation with a journal: frames idempotent by (stream, seq)
app.py      the deployments: FaceModel (batched), State (gallery + streams), Api (HTTP ingress)
deploy.py   deploy / remove the application on a Ray cluster
"""
