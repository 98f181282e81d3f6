"""image: rotate, flip, blur and resize a 1024x1024 RGB image with Pillow (FunctionBench image_processing)."""
import random

from PIL import Image, ImageFilter


def init(arg):
    rng = random.Random(4)
    img = Image.frombytes("RGB", (1024, 1024), rng.randbytes(1024 * 1024 * 3))
    img.load()
    return img


def handler(img):
    out = img.rotate(90, expand=True).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = out.filter(ImageFilter.GaussianBlur(2)).filter(ImageFilter.SHARPEN)
    out = out.resize((512, 512), Image.Resampling.BILINEAR)
    return out.tobytes()
