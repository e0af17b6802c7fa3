# A guest script that fails: the lab must fail the run and show this output.
echo "a failure the guest reports on purpose"
exit 3
