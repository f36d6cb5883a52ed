"""Epsilon-prediction training and DDIM sampling with diffusers' noise schedulers."""
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler


def schedulers(cfg):
    kwargs = dict(num_train_timesteps=cfg.train_steps, beta_schedule=cfg.beta_schedule, clip_sample=cfg.clip_sample,
                  prediction_type="epsilon")
    return DDPMScheduler(**kwargs), DDIMScheduler(**kwargs)


def device_of(module):
    return next(module.parameters()).device


def model_inputs(batch, tokenizer, device="cpu"):
    text = tokenizer(list(batch["instruction"]), padding=True, return_tensors="pt")
    return batch["image"].to(device), text.input_ids.to(device), text.attention_mask.to(device), \
        batch["state"].to(device)


def noise_prediction(policy, train_scheduler, batch, tokenizer, generator=None, share=slice(None)):
    """Loss (MSE against the added noise) and the predicted noise for one batch. Noise and timesteps are drawn on
    the CPU for the whole batch, so every device and every process count draws the same; `share` is the part of the
    batch this process trains on (distributed training)."""
    noise = torch.randn(batch["actions"].shape, generator=generator)[share]
    t = torch.randint(0, train_scheduler.config.num_train_timesteps, (len(batch["actions"]),), generator=generator)[share]
    batch = {k: v[share] for k, v in batch.items()}
    device = device_of(policy)
    noise, t = noise.to(device), t.to(device)
    noisy = train_scheduler.add_noise(batch["actions"].to(device), noise, t)
    pred = policy(*model_inputs(batch, tokenizer, device), noisy, t)
    if "pad" in batch:  # padded steps past an episode's end (data.past_end=mask) are no targets
        real = ~batch["pad"].to(device)[..., None].expand_as(noise)
        return F.mse_loss(pred.float()[real], noise[real]), pred
    return F.mse_loss(pred.float(), noise), pred


@torch.no_grad()
def sample_actions(policy, ddim, batch, tokenizer, steps, generator):
    """Action chunks drawn with `steps` DDIM steps; the VLM runs once, the head once per step."""
    device = device_of(policy)
    images, ids, mask, state = model_inputs(batch, tokenizer, device)
    cond = policy.encode(images, ids, mask)
    x = torch.randn(batch["actions"].shape, generator=generator).to(device)
    ddim.set_timesteps(steps)
    for t in ddim.timesteps:
        eps = policy.embed_out(x, t.expand(len(x)).to(device), cond, state)
        x = ddim.step(eps.float(), t, x).prev_sample
    return x.cpu()
