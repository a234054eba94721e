"""The `mt` commands, one module each: `add_parser(sub)` adds its parser to mt.cli's, `run(args)`
does the work and returns the exit status. Only the chosen command's module is imported, so each
keeps its heavy imports (torch, sacreBLEU, CTranslate2) inside the functions that need them;
mt.commands.options holds what several commands share."""
