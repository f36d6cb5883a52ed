"""Epsilon-prediction training and DDIM sampling with diffusers' noise schedulers."""
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler


def schedulers(cfg):
    kwargs = dict(num_train_timesteps=cfg.train_steps, beta_schedule=cfg.beta_schedule, clip_sample=cfg.clip_sample,
                  prediction_type="epsilon")
    return DDPMScheduler(**kwargs), DDIMScheduler(**kwargs)


def model_inputs(batch, tokenizer):
    text = tokenizer(list(batch["instruction"]), padding=True, return_tensors="pt")
    images = batch["image"].float() / 127.5 - 1
    return images, text.input_ids, text.attention_mask, batch["state"]


def noise_prediction(policy, train_scheduler, batch, tokenizer, generator=None):
    """Loss (MSE against the added noise) and the predicted noise for one batch."""
    actions = batch["actions"]
    noise = torch.randn(actions.shape, generator=generator)
    t = torch.randint(0, train_scheduler.config.num_train_timesteps, (len(actions),), generator=generator)
    noisy = train_scheduler.add_noise(actions, noise, t)
    pred = policy(*model_inputs(batch, tokenizer), noisy, t)
    return F.mse_loss(pred, noise), pred


@torch.no_grad()
def sample_actions(policy, ddim, batch, tokenizer, steps, generator):
    """Action chunks drawn with `steps` DDIM steps; the VLM runs once, the head once per step."""
    images, ids, mask, state = model_inputs(batch, tokenizer)
    cond = policy.encode(images, ids, mask)
    x = torch.randn(batch["actions"].shape, generator=generator)
    ddim.set_timesteps(steps)
    for t in ddim.timesteps:
        eps = policy.embed_out(x, t.expand(len(x)), cond, state)
        x = ddim.step(eps, t, x).prev_sample
    return x
