"""Image-only plugins: an extractor that exists only inside a container image, in pyclowder's layout.

pyclowder's Dockerfiles put extractor_info.json and the script in the image's WORKDIR
(`WORKDIR /extractor` then `COPY wordcount.py extractor_info.json ./`; older images use
/home/clowder). Such a plugin is named in the `plugins:` table with a `container:` and no plugin
folder of that name on the host:

    plugins:
      wordcount:
        container: {runtime: charliecloud, image: /scratch/images/wordcount}

The agent reads the image's folder from the host side, so the image must be a directory image
(Charliecloud's, or an Apptainer sandbox): extractor_info.json gives the name, the image's ENV
(ch/metadata.json or ch/environment, as ch-image writes them) gives the defaults and the queue
(RABBITMQ_QUEUE, else the extractor's name, as pyclowder does), WORKDIR (metadata "cwd") says where
to look first. The spec's paths are the paths inside the image, where the extractor process runs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from .container_runtime import ContainerSetting, image_env, image_metadata, parse_container
from .errors import PluginError
from .plugin_loader import INFO_FILE, EntryDefaults, PluginSpec, discover, find_plugin, inspect_folder
from .plugin_settings import entry_defaults

#: where pyclowder's Dockerfiles put an extractor, tried after the image's own WORKDIR
LAYOUT_FOLDERS = ("/extractor", "/home/clowder")


def _inside(image: str, path: str) -> str:
    return os.path.join(image, path.lstrip("/"))


def extractor_folder(image: str) -> Optional[str]:
    """The folder inside the image holding extractor_info.json (its WORKDIR first), or None."""
    cwd = image_metadata(image).get("cwd")
    for folder in ([cwd] if isinstance(cwd, str) and cwd.startswith("/") else []) + list(LAYOUT_FOLDERS):
        if os.path.isfile(_inside(image, os.path.join(folder, INFO_FILE))):
            return folder
    return None


def inspect_image(table_name: str, setting: ContainerSetting,
                  defaults: Optional[EntryDefaults] = None) -> PluginSpec:
    """The spec of the extractor held in setting.image (PluginError when it is not in pyclowder's layout)."""
    if not os.path.isdir(setting.image):
        raise PluginError(f"plugin {table_name}: no plugin folder of that name, and its image {setting.image} "
                          "is not a directory image the agent can read (image-only plugins need one)")
    folder = extractor_folder(setting.image)
    if folder is None:
        raise PluginError(f"plugin {table_name}: image {setting.image} holds no {INFO_FILE} in its WORKDIR or "
                          f"in {', '.join(LAYOUT_FOLDERS)}")
    env = image_env(setting.image)
    host_spec = inspect_folder(_inside(setting.image, folder), defaults, image_env=env)

    def in_image(path: str) -> str:
        return "/" + os.path.relpath(path, setting.image) if path else path

    # The image's pip installed its requirements.txt already: no environment of the plugin's own.
    return dataclasses.replace(host_spec, folder=folder, script=in_image(host_spec.script), requirements=None,
                               image=setting.image, alias=table_name, queue=env.get("RABBITMQ_QUEUE", ""))


def _image_entries(cfg: Any) -> list[tuple[str, ContainerSetting]]:
    table = getattr(cfg, "plugins", None) or {}
    return [(str(name), parse_container(entry["container"])) for name, entry in table.items()
            if entry.get("container")]


def find(cfg: Any, name: Optional[str]) -> PluginSpec:
    """The plugin called name: a plugin folder (agent.plugin_loader), else an image-only plugin of the table."""
    try:
        return find_plugin(name, cfg.plugin_path, entry_defaults(cfg))
    except PluginError:
        images = _image_entries(cfg)
        for table_name, setting in images:
            if name == table_name:
                return inspect_image(table_name, setting, entry_defaults(cfg))
        for table_name, setting in images:  # asked for by the extractor_info name the image holds
            try:
                spec = inspect_image(table_name, setting, entry_defaults(cfg))
            except PluginError:
                continue
            if name == spec.name:
                return spec
        if name is None:
            found, _ = discover(cfg.plugin_path, entry_defaults(cfg))
            only_image = [(n, s) for n, s in images if not any(n in (p.name, p.folder_name) for p in found)]
            if not found and len(only_image) == 1:
                return inspect_image(only_image[0][0], only_image[0][1], entry_defaults(cfg))
        raise


def discover_all(cfg: Any) -> tuple[list[PluginSpec], list[str]]:
    """Plugin folders and image-only plugins, and one problem line per broken one."""
    found, problems = discover(cfg.plugin_path, entry_defaults(cfg))
    for table_name, setting in _image_entries(cfg):
        if any(table_name in (p.name, p.folder_name) for p in found):
            continue  # a plugin folder of that name: its extractor runs in the image, it is not image-only
        try:
            found.append(inspect_image(table_name, setting, entry_defaults(cfg)))
        except PluginError as exc:
            problems.append(str(exc))
    return found, problems
