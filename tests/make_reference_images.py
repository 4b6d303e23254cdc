"""Regenerates the pinned renders in tests/fixtures (run only after a deliberate change of the
rendering stack, and say why in the commit): python tests/make_reference_images.py"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
from pathlib import Path

from PIL import Image

from rsd_ray.env.libero_env import LiberoTaskEnv, load_task
from rsd_ray.env.preprocess import policy_image

out = Path(__file__).parent / "fixtures"
out.mkdir(exist_ok=True)
env = LiberoTaskEnv(load_task("libero_spatial", 0))
try:
    raw_after_wait = env.start_trial(0)
    Image.fromarray(policy_image(raw_after_wait["agentview_image"], 224)).save(out / "spatial0_trial0_after_wait_agentview.png")
    env.start_trial(0)
    raw = env.render_now()
    Image.fromarray(policy_image(raw["agentview_image"], 224)).save(out / "spatial0_trial0_agentview.png")
    Image.fromarray(policy_image(raw["robot0_eye_in_hand_image"], 224)).save(out / "spatial0_trial0_wrist.png")
finally:
    env.close()
print("wrote", sorted(p.name for p in out.glob("*.png")))
