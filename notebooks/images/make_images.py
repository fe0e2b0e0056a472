"""Draw the small sample images the notebooks use (run: python notebooks/images/make_images.py).

Everything is drawn here with Pillow, so the images carry no licence questions and are never
fetched. house_day.png and house_night.png were drawn earlier and are kept as they are; this
script makes the knowledge-base pictures of notebook 03: a bar chart, a wiring diagram and a
floor plan made of coloured shapes. Each file stays well under 30 KB.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
INK = (40, 40, 48)
PAPER = (250, 250, 246)


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def centered(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, size: int, fill=INK) -> None:
    x0, y0, x1, y1 = box
    draw.multiline_text(((x0 + x1) / 2, (y0 + y1) / 2), text, font=font(size), fill=fill, anchor="mm", align="center")


def energy_chart() -> Image.Image:
    """Monthly electricity use, January to June: January is the peak."""
    data = [("Jan", 610), ("Feb", 520), ("Mar", 430), ("Apr", 340), ("May", 280), ("Jun", 250)]
    img = Image.new("RGB", (480, 320), PAPER)
    d = ImageDraw.Draw(img)
    centered(d, (0, 0, 480, 40), "Electricity use per month (kWh)", 18)
    left, bottom, top, right = 60, 280, 50, 460
    d.line((left, top, left, bottom), fill=INK, width=2)
    d.line((left, bottom, right, bottom), fill=INK, width=2)
    for tick in range(0, 701, 100):
        y = bottom - (bottom - top) * tick / 700
        d.line((left - 5, y, left, y), fill=INK, width=1)
        d.text((left - 8, y), str(tick), font=font(11), fill=INK, anchor="rm")
    slot = (right - left) / len(data)
    for i, (month, kwh) in enumerate(data):
        x0 = left + i * slot + 10
        y0 = bottom - (bottom - top) * kwh / 700
        d.rectangle((x0, y0, x0 + slot - 20, bottom - 1), fill=(200, 70, 50) if i == 0 else (70, 120, 190))
        d.text((x0 + (slot - 20) / 2, y0 - 4), str(kwh), font=font(11), fill=INK, anchor="md")
        d.text((x0 + (slot - 20) / 2, bottom + 6), month, font=font(13), fill=INK, anchor="mt")
    return img


def solar_diagram() -> Image.Image:
    """Solar panels -> inverter -> battery and house; the grid connects to the inverter."""
    img = Image.new("RGB", (480, 320), PAPER)
    d = ImageDraw.Draw(img)
    centered(d, (0, 0, 480, 36), "Home solar wiring", 18)
    boxes = {
        "Solar panels": ((20, 130, 120, 190), (250, 210, 60)),
        "Inverter": ((190, 130, 290, 190), (150, 150, 160)),
        "Battery": ((360, 60, 460, 120), (90, 180, 90)),
        "House": ((360, 200, 460, 260), (200, 80, 60)),
        "Grid": ((190, 250, 290, 300), (120, 160, 220)),
    }
    for label, (box, colour) in boxes.items():
        d.rounded_rectangle(box, radius=10, fill=colour, outline=INK, width=2)
        centered(d, box, label, 15)

    def arrow(a: tuple[int, int], b: tuple[int, int]) -> None:
        d.line((a, b), fill=INK, width=3)
        (x0, y0), (x1, y1) = a, b
        length = max(1.0, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
        ux, uy = (x1 - x0) / length, (y1 - y0) / length
        d.polygon(
            [(x1, y1), (x1 - 12 * ux + 6 * uy, y1 - 12 * uy - 6 * ux), (x1 - 12 * ux - 6 * uy, y1 - 12 * uy + 6 * ux)],
            fill=INK,
        )

    arrow((120, 160), (188, 160))
    arrow((290, 150), (358, 95))
    arrow((290, 170), (358, 225))
    arrow((240, 248), (240, 192))
    return img


def floor_plan() -> Image.Image:
    """Ground floor as coloured shapes: four rooms, a round table, a triangular stair."""
    img = Image.new("RGB", (480, 320), PAPER)
    d = ImageDraw.Draw(img)
    centered(d, (0, 0, 480, 36), "Ground floor plan", 18)
    rooms = [
        ("Kitchen", (20, 45, 220, 175), (245, 215, 90)),
        ("Living room", (220, 45, 460, 300), (120, 160, 220)),
        ("Bedroom", (20, 175, 150, 300), (120, 190, 120)),
        ("Bath", (150, 175, 220, 300), (220, 110, 100)),
    ]
    for label, box, colour in rooms:
        d.rectangle(box, fill=colour, outline=INK, width=3)
        centered(d, (box[0], box[1] + 8, box[2], box[1] + 30), label, 14)
    d.ellipse((90, 95, 150, 155), fill=(150, 100, 60), outline=INK, width=2)  # kitchen table
    d.polygon([(400, 280), (450, 280), (450, 220)], fill=(90, 90, 100))  # stairs
    return img


def main() -> None:
    for name, draw in (
        ("energy_chart.png", energy_chart),
        ("solar_diagram.png", solar_diagram),
        ("floor_plan.png", floor_plan),
    ):
        path = HERE / name
        draw().save(path, optimize=True)
        size = path.stat().st_size
        assert size < 30_000, f"{name} is {size} bytes"
        print(f"{name}: {size} bytes")


if __name__ == "__main__":
    main()
