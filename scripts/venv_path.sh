# Sourced by setup_env.sh and test.sh: the virtual environment they use. TRACE_DS_VENV names one; otherwise
# .venv holds the tested versions (constraints.txt) and .venv-latest the newest (TRACE_DS_LATEST=1), so trying
# the newest never disturbs the tested one.
if [ "${TRACE_DS_LATEST:-0}" = 1 ]; then
  VENV="${TRACE_DS_VENV:-.venv-latest}"
else
  VENV="${TRACE_DS_VENV:-.venv}"
fi
