"""The experiment harness: command line, demo and (later) training runs. Built on the library core
(``localsgd``), which never imports from here."""
