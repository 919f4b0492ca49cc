"""``xpcnn bench``: the case protocol (:mod:`.cases`), the sessions that pair and interleave the cases'
processes (:mod:`.sessions`), and the rows and table of their results (:mod:`.formatting`)."""
