# ruff: noqa: RUF001 (full-width punctuation is correct in the Chinese column)
"""The console's user-facing strings: one row per string, one column per language (English and
Chinese, as LlamaBoard offers). Templates look every label up here, so a new language is one more
column."""

from __future__ import annotations

LANGUAGES = ("en", "zh")
STRINGS = {
    "title": ("kubetune console", "kubetune 控制台"),
    "jobs": ("Jobs", "任务"),
    "launch": ("Launch", "启动"),
    "compare": ("Compare", "对比"),
    "playground": ("Playground", "对话测试"),
    "language": ("Language", "语言"),
    "theme": ("Theme", "主题"),
    "toggleTheme": ("Toggle dark/light", "切换深色/浅色"),
    "name": ("Name", "名称"),
    "kind": ("Kind", "类型"),
    "namespace": ("Namespace", "命名空间"),
    "phase": ("Phase", "阶段"),
    "progress": ("Progress", "进度"),
    "loss": ("Loss", "损失"),
    "eta": ("ETA", "剩余时间"),
    "attempts": ("Attempts", "尝试次数"),
    "age": ("Age", "存在时间"),
    "filter": ("Filter", "筛选"),
    "all": ("all", "全部"),
    "noJobs": ("No runs yet. Start one from Launch.", "还没有运行。请在“启动”页开始。"),
    "localRuns": ("Local runs", "本地运行"),
    "clusterResources": ("Cluster resources", "集群资源"),
    "status": ("Status", "状态"),
    "conditions": ("Conditions", "条件"),
    "events": ("Events", "事件"),
    "spec": ("Resolved spec", "解析后的配置"),
    "log": ("Run log", "运行日志"),
    "podLogs": ("Pod logs", "Pod 日志"),
    "curves": ("Curves", "曲线"),
    "samples": ("Sample generations", "生成样例"),
    "before": ("before", "训练前"),
    "after": ("after", "训练后"),
    "learningRate": ("Learning rate", "学习率"),
    "tokensPerSecond": ("Tokens per second", "每秒词元数"),
    "noData": ("no data yet", "暂无数据"),
    "form": ("Form", "表单"),
    "yaml": ("YAML", "YAML"),
    "applyYaml": ("YAML to form", "YAML 填入表单"),
    "estimate": ("Memory estimate (per GPU)", "显存估算（每 GPU）"),
    "component": ("Component", "组成"),
    "gib": ("GiB", "GiB"),
    "total": ("total", "合计"),
    "nodes": ("Nodes", "节点数"),
    "gpusPerNode": ("GPUs per node", "每节点 GPU 数"),
    "run": ("Run (local)", "运行（本地）"),
    "apply": ("Apply (cluster)", "提交（集群）"),
    "addItem": ("Add an item to", "添加一项："),
    "launchKind": ("What to launch", "启动类型"),
    "trainingJob": ("Training job", "训练任务"),
    "resource": ("Resource", "资源"),
    "actingAs": ("Acting in the cluster as this user (impersonation)", "以此用户身份操作集群（身份模拟）"),
    "valid": ("The spec is valid.", "配置有效。"),
    "invalid": ("The spec has problems:", "配置有问题："),
    "default": ("default", "默认"),
    "unset": ("(default)", "（默认）"),
    "estimateUnknown": ("The model's size is unknown here; no estimate.", "此处无法得知模型大小，无法估算。"),
    "servingWontStart": ("The model cannot start in this GPU memory: the check above says what would.",
                         "模型在此显存中无法启动：上方的检查结果给出了可行的设置。"),
    "servingEstimateUnknown": ("Set gpuMemoryGiB (and modelParameters when model.uri names no known model) to see "
                               "whether the model starts: weights, activations and KV cache per GPU.",
                               "设置 gpuMemoryGiB（model.uri 不是已知模型时再设置 modelParameters），即可查看模型能否启动："
                               "每块 GPU 上的权重、激活与 KV 缓存。"),
    "compareHelp": ("Pick runs to overlay their curves.", "选择要叠加曲线的运行。"),
    "show": ("Show", "显示"),
    "endpoint": ("Endpoint (OpenAI-compatible base URL)", "接口地址（OpenAI 兼容）"),
    "model": ("Model or adapter", "模型或适配器"),
    "temperature": ("Temperature", "温度"),
    "maxTokens": ("Max tokens", "最大词元数"),
    "system": ("System prompt", "系统提示词"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "answer": ("Answer", "回答"),
    "launched": ("Started", "已启动"),
    "fixErrors": ("Fix the fields marked below.", "请修正下方标出的字段。"),
}

TABLES = {lang: {key: row[i] for key, row in STRINGS.items()} for i, lang in enumerate(LANGUAGES)}


def strings(lang: str | None) -> dict[str, str]:
    return TABLES.get(lang or "en", TABLES["en"])
