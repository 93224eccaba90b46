// The submit form: upload a JSONL file (POST /v1/files), then create the job with the chosen
// options (POST /v1/fine_tuning/jobs); errors name the field the server names.

import { get, post } from "./api.js";
import { h, mount, toast } from "./dom.js";

function field(id, label, input, hint) {
  input.id = id;
  input.name = id;
  return h("div", {}, h("label", { for: id }, label, hint ? h("span", { class: "hint" }, ` — ${hint}`) : null), input);
}

const numberInput = (attrs) => h("input", { type: "number", inputmode: "decimal", ...attrs });

export function renderSubmit(el) {
  const model = h("select", { required: true });
  const form = h("form", { class: "card narrow", id: "submit-form", novalidate: false },
    field("model", "Base model", model),
    field("training_file", "Training data", h("input", { type: "file", accept: ".jsonl,.json,application/jsonl", required: true }),
      "JSONL: chat messages, prompt/completion or text"),
    field("validation_file", "Validation data (optional)", h("input", { type: "file", accept: ".jsonl,.json" })),
    h("fieldset", {}, h("legend", {}, "Options (blank: automatic)"),
      h("div", { class: "row" },
        field("n_epochs", "Epochs", numberInput({ min: 1, max: 50, step: 1 })),
        field("batch_size", "Batch size", numberInput({ min: 1, max: 256, step: 1 })),
        field("learning_rate", "Learning rate", numberInput({ min: 0, step: "any" })),
        field("max_seq_len", "Max sequence length", numberInput({ min: 16, step: 1 })),
        field("lora_r", "LoRA rank", numberInput({ min: 1, max: 256, step: 1 })),
        field("suffix", "Suffix", h("input", { type: "text", maxlength: 40 })))),
    h("button", { type: "submit" }, "Upload and submit"),
    h("p", { class: "error", id: "submit-error", role: "alert" }));
  mount(el, h("h2", {}, "Submit a job"), form);

  get("/v1/models", { limit: 1000 }).then((page) => {
    mount(model, page.data.map((m) => h("option", { value: m.id }, m.id)));
  }).catch((err) => toast(err.message));

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const err = form.querySelector("#submit-error");
    const button = form.querySelector("button[type=submit]");
    err.textContent = "";
    button.disabled = true;
    const v = (name) => form.elements[name].value.trim();
    try {
      const upload = async (name) => {
        const file = form.elements[name].files[0];
        if (!file) return null;
        const data = new FormData();
        data.append("purpose", "fine-tune");
        data.append("file", file, file.name);
        button.textContent = `Uploading ${file.name}…`;
        return (await post("/v1/files", data)).id;
      };
      const training = await upload("training_file");
      if (!training) throw Object.assign(new Error("Choose a training file."), { param: "training_file" });
      const validation = await upload("validation_file");
      const hyper = {};
      if (v("n_epochs")) hyper.n_epochs = Number(v("n_epochs"));
      if (v("batch_size")) hyper.batch_size = Number(v("batch_size"));
      const body = { model: model.value, training_file: training, hyperparameters: hyper };
      if (validation) body.validation_file = validation;
      if (v("learning_rate")) body.learning_rate = Number(v("learning_rate"));
      if (v("max_seq_len")) body.max_seq_len = Number(v("max_seq_len"));
      if (v("lora_r")) body.lora = { r: Number(v("lora_r")) };
      if (v("suffix")) body.suffix = v("suffix");
      button.textContent = "Submitting…";
      const job = await post("/v1/fine_tuning/jobs", body);
      toast(`Job ${job.id} submitted.`);
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      err.textContent = e.param ? `${e.param}: ${e.message}` : e.message;
      const bad = e.param && form.elements[e.param.split(".").pop()];
      if (bad && bad.focus) bad.focus();
    } finally {
      button.disabled = false;
      button.textContent = "Upload and submit";
    }
  });
}
