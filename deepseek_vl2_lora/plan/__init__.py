"""The dry-run memory plan (`trainer.dry_run=true`): one full-size training step on fake tensors, measured per GPU
for one process, ZeRO-2 and ZeRO-3. planner.py is the entry point; measure.py runs the step, fake.py makes the
fake execution faithful, tracker.py counts memory, zero.py holds DeepSpeed's sharding rules, batch.py the planned
batch."""
