"""Label the bibliography "Hu et al., 2022", as the citations in the text read.

sphinxcontrib-bibtex writes citations author-year (``bibtex_reference_style:
author_year``) but labels the list with pybtex's alpha labels ("[HSW+22]"). This style
gives the list the same author-year labels and sorts it by author, year and title.
Registered as the pybtex formatting style ``author_year_labels`` (``_config.yml``).
"""

import pybtex.plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle


def _surname(person) -> str:
    return str(Text.from_latex(" ".join(person.prelast_names + person.last_names)))


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            names = [_surname(p) for p in entry.persons.get("author", [])]
            if len(names) > 2:
                who = f"{names[0]} et al."
            else:
                who = " and ".join(names)
            yield f"{who}, {entry.fields['year']}"


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabels
    default_sorting_style = SortingStyle


def setup(app):
    pybtex.plugin.register_plugin("pybtex.style.formatting", "author_year_labels", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
