# The cluster image (KubeRay manifests in deployments/): Ray's own GPU image plus this package,
# pinned by constraints.txt. Build: docker build -t <registry>/ray-faceid:<version> .
# TensorRT: add `tensorrt` to the extras and `--extra-index-url https://pypi.nvidia.com`.
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /home/ray/ray_faceid
RUN pip install --no-cache-dir -c /home/ray/ray_faceid/constraints.txt "/home/ray/ray_faceid[data,train,serve,ui,sface,s3,gcs,onnx]" \
 && pip install --no-cache-dir --no-deps "facenet-pytorch==2.6.0"
# facenet-pytorch: MTCNN's weights for the small-face pass (MIT); --no-deps, it pins an old torch.
WORKDIR /home/ray/ray_faceid
