"""Where NVlabs publishes its pretrained networks, and the EDM2 generate_images.py presets (spec §13.4).

Nothing is downloaded (the machines this runs on often cannot reach the internet): `resolve_preset` finds a
preset's files in a local folder, or names the URLs to fetch them from.
"""

import os

EDM2_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'

# preset: (network, guiding network or None, guidance or None), as edm2-<name>.pkl under EDM2_ROOT; the metric is
# the one NVlabs reports for the preset (FID or FD_DINOv2 over 50,000 images).
EDM2_PRESETS = {
    'edm2-img512-xs-fid': ('img512-xs-2147483-0.135', None, None),  # FID 3.53
    'edm2-img512-xs-dino': ('img512-xs-2147483-0.200', None, None),  # FD_DINOv2 103.39
    'edm2-img512-s-fid': ('img512-s-2147483-0.130', None, None),  # FID 2.56
    'edm2-img512-s-dino': ('img512-s-2147483-0.190', None, None),  # FD_DINOv2 68.64
    'edm2-img512-m-fid': ('img512-m-2147483-0.100', None, None),  # FID 2.25
    'edm2-img512-m-dino': ('img512-m-2147483-0.155', None, None),  # FD_DINOv2 58.44
    'edm2-img512-l-fid': ('img512-l-1879048-0.085', None, None),  # FID 2.06
    'edm2-img512-l-dino': ('img512-l-1879048-0.155', None, None),  # FD_DINOv2 52.25
    'edm2-img512-xl-fid': ('img512-xl-1342177-0.085', None, None),  # FID 1.96
    'edm2-img512-xl-dino': ('img512-xl-1342177-0.155', None, None),  # FD_DINOv2 45.96
    'edm2-img512-xxl-fid': ('img512-xxl-0939524-0.070', None, None),  # FID 1.91
    'edm2-img512-xxl-dino': ('img512-xxl-0939524-0.150', None, None),  # FD_DINOv2 42.84
    'edm2-img64-s-fid': ('img64-s-1073741-0.075', None, None),  # FID 1.58
    'edm2-img64-m-fid': ('img64-m-2147483-0.060', None, None),  # FID 1.43
    'edm2-img64-l-fid': ('img64-l-1073741-0.040', None, None),  # FID 1.33
    'edm2-img64-xl-fid': ('img64-xl-0671088-0.040', None, None),  # FID 1.33
    'edm2-img512-xs-guid-fid': ('img512-xs-2147483-0.045', 'img512-xs-uncond-2147483-0.045', 1.4),  # FID 2.91
    'edm2-img512-xs-guid-dino': ('img512-xs-2147483-0.150', 'img512-xs-uncond-2147483-0.150', 1.7),  # FD_DINOv2 79.94
    'edm2-img512-s-guid-fid': ('img512-s-2147483-0.025', 'img512-xs-uncond-2147483-0.025', 1.4),  # FID 2.23
    'edm2-img512-s-guid-dino': ('img512-s-2147483-0.085', 'img512-xs-uncond-2147483-0.085', 1.9),  # FD_DINOv2 52.32
    'edm2-img512-m-guid-fid': ('img512-m-2147483-0.030', 'img512-xs-uncond-2147483-0.030', 1.2),  # FID 2.01
    'edm2-img512-m-guid-dino': ('img512-m-2147483-0.015', 'img512-xs-uncond-2147483-0.015', 2.0),  # FD_DINOv2 41.98
    'edm2-img512-l-guid-fid': ('img512-l-1879048-0.015', 'img512-xs-uncond-2147483-0.015', 1.2),  # FID 1.88
    'edm2-img512-l-guid-dino': ('img512-l-1879048-0.035', 'img512-xs-uncond-2147483-0.035', 1.7),  # FD_DINOv2 38.20
    'edm2-img512-xl-guid-fid': ('img512-xl-1342177-0.020', 'img512-xs-uncond-2147483-0.020', 1.2),  # FID 1.85
    'edm2-img512-xl-guid-dino': ('img512-xl-1342177-0.030', 'img512-xs-uncond-2147483-0.030', 1.7),  # FD_DINOv2 35.67
    'edm2-img512-xxl-guid-fid': ('img512-xxl-0939524-0.015', 'img512-xs-uncond-2147483-0.015', 1.2),  # FID 1.81
    'edm2-img512-xxl-guid-dino': ('img512-xxl-0939524-0.015', 'img512-xs-uncond-2147483-0.015', 1.7),  # FD_DINOv2 33.09
    'edm2-img512-s-autog-fid': ('img512-s-2147483-0.070', 'img512-xs-0134217-0.125', 2.1),  # FID 1.34
    'edm2-img512-s-autog-dino': ('img512-s-2147483-0.120', 'img512-xs-0134217-0.165', 2.45),  # FD_DINOv2 36.67
    'edm2-img512-xxl-autog-fid': ('img512-xxl-0939524-0.075', 'img512-m-0268435-0.155', 2.05),  # FID 1.25
    'edm2-img512-xxl-autog-dino': ('img512-xxl-0939524-0.130', 'img512-m-0268435-0.205', 2.3),  # FD_DINOv2 24.18
    'edm2-img512-s-uncond-autog-fid': ('img512-s-uncond-2147483-0.070', 'img512-xs-uncond-0134217-0.110', 2.85),  # FID 3.86
    'edm2-img512-s-uncond-autog-dino': ('img512-s-uncond-2147483-0.090', 'img512-xs-uncond-0134217-0.125', 2.9),  # FD_DINOv2 90.39
    'edm2-img64-s-autog-fid': ('img64-s-1073741-0.045', 'img64-xs-0134217-0.110', 1.7),  # FID 1.01
    'edm2-img64-s-autog-dino': ('img64-s-1073741-0.105', 'img64-xs-0134217-0.175', 2.2),  # FD_DINOv2 31.85
}


class PresetError(ValueError):
    pass


def edm2_file(name):
    return f'edm2-{name}.pkl'


def resolve_preset(preset, model_dir):
    """dict(net=path, gnet=path or None, guidance=float or None) of an EDM2 preset, with files in `model_dir`.

    Raises PresetError naming the unknown preset, or the files to download and where to put them.
    """
    if preset not in EDM2_PRESETS:
        raise PresetError(f'unknown preset {preset!r}; one of: {", ".join(EDM2_PRESETS)}')
    net, gnet, guidance = EDM2_PRESETS[preset]
    files = [edm2_file(n) for n in (net, gnet) if n is not None]
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise PresetError(f'--models={model_dir} is a file, not a folder; pass the folder holding the preset\'s '
                          f'.pkl files')
    missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
    if missing:
        urls = ' '.join(f'{EDM2_ROOT}/{f}' for f in missing)
        raise PresetError(f'preset {preset} needs {", ".join(missing)} in {os.path.abspath(model_dir)} (nothing is '
                          f'downloaded here): fetch them, e.g. `wget -P {model_dir} {urls}`, or pass --models=DIR '
                          f'where they are')
    paths = [os.path.join(model_dir, f) for f in files]
    return dict(net=paths[0], gnet=paths[1] if gnet else None, guidance=guidance)
